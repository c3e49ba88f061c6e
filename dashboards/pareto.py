"""Pareto fronts: the points no other point beats on both cost (lower) and quality (higher)."""

from __future__ import annotations

import math
import warnings

import pandas as pd

from core.keys import higher_is_better

__all__ = ["VS_FRONT", "front_status", "higher_is_better", "pareto_front"]


def pareto_front(
    df: pd.DataFrame,
    cost: str,
    quality: str,
    quality_higher_is_better: bool = True,
) -> pd.DataFrame:
    """Rows of ``df`` on the front of (min ``cost``, best ``quality``), sorted by cost.

    A point is dominated when another point is at least as good on both axes and strictly
    better on one; exact duplicates (ties on both axes) are all kept. Rows with NaN in either
    column are dropped with a warning.
    """
    if df.empty:
        return df.copy()
    mask = df[cost].map(_finite) & df[quality].map(_finite)
    if not mask.all():
        warnings.warn(
            f"pareto_front: dropped {int((~mask).sum())} point(s) with NaN {cost!r} or {quality!r}",
            stacklevel=2,
        )
    pts = df[mask]
    sign = 1.0 if quality_higher_is_better else -1.0
    c = pts[cost].astype(float).tolist()
    q = [sign * float(v) for v in pts[quality]]
    keep = []
    for i in range(len(pts)):
        dominated = any(
            c[j] <= c[i] and q[j] >= q[i] and (c[j] < c[i] or q[j] > q[i])
            for j in range(len(pts))
            if j != i
        )
        keep.append(not dominated)
    front = pts[keep]
    return front.sort_values([cost, quality], ascending=[True, not quality_higher_is_better])


def _finite(v: object) -> bool:
    try:
        return v is not None and math.isfinite(float(v))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


VS_FRONT = "vs_front"
"""Column of ``front_status``: 'front', '≈ front' (its CI reaches the front) or ''."""


def front_status(
    points: pd.DataFrame, cost: str, quality: str, quality_higher_is_better: bool = True
) -> pd.Series:
    """Per point: 'front' when on the Pareto front; '≈ front' when its 95% interval
    (``{quality}_ci_low``/``_ci_high``, e.g. across seeds) reaches the best quality the front
    offers at no more cost, so it cannot be told apart from the front; else ''."""
    front = pareto_front(points, cost, quality, quality_higher_is_better)
    status = pd.Series("", index=points.index, dtype=object)
    status[status.index.isin(front.index)] = "front"
    bound = f"{quality}_ci_high" if quality_higher_is_better else f"{quality}_ci_low"
    if bound not in points or front.empty:
        return status
    for i, row in points.iterrows():
        cheaper = front[front[cost] <= row[cost]][quality]
        if status[i] or cheaper.empty or not _finite(row[bound]):
            continue
        best = cheaper.max() if quality_higher_is_better else cheaper.min()
        reaches = row[bound] >= best if quality_higher_is_better else row[bound] <= best
        status[i] = "≈ front" if reaches else ""
    return status
