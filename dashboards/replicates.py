"""Replicates (a sweep's ``seeds:``): one configuration's runs as one row, with its 95% CI.

A configuration is what its runs' ``mor.replicate_of`` tag names (the trial label without the
seed). The interval across seeds is ``dashboards.stats.seed_ci`` (Student-t over the per-seed
values); why that, and not a sum with the item-level interval, is in ``dashboards.stats``.
"""

from __future__ import annotations

import pandas as pd

from dashboards.stats import bpb_ci, mean_over_tasks_ci, seed_ci

SUMMARISED = ("val_nll", "average", "flops_per_token", "mean_depth")
"""Columns of the results table summarised across seeds (plus the report's headline metric)."""


def has_replicates(trials: pd.DataFrame) -> bool:
    """Whether some configuration ran with more than one seed."""
    return "replicate_of" in trials and trials["replicate_of"].duplicated().any()


def by_config(table: pd.DataFrame, trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per configuration: its model, how many seeds finished, and for each summarised
    column the mean across seeds with ``_ci_low``/``_ci_high``."""
    groups = trials.set_index("run_id")["replicate_of"]
    table = table.assign(replicate_of=table["run_id"].map(groups))
    cols = [c for c in dict.fromkeys((metric, *SUMMARISED)) if c in table.columns]
    rows = []
    for config, grp in table.groupby("replicate_of", sort=True):
        row = {"configuration": config, "model": grp["model"].iloc[0], "seeds": len(grp)}
        for col in cols:
            ci = seed_ci(grp[col].dropna().astype(float).tolist())
            row.update({col: ci.mean, f"{col}_ci_low": ci.low, f"{col}_ci_high": ci.high})
        rows.append(row)
    return pd.DataFrame(rows)


def aggregate_points(points: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Each configuration's depth points averaged over its seeds (what the figures draw),
    with ``{metric}_ci_low``/``{metric}_ci_high`` across seeds for error bars."""
    if "replicate_of" not in points or not points.duplicated(["replicate_of", "point"]).any():
        return points
    numeric = points.select_dtypes("number").columns.difference(["num_recursions"])
    rows = []
    for _, grp in points.groupby(["replicate_of", "point"], sort=True):
        row = grp.iloc[0].copy()
        row[numeric] = grp[numeric].mean()
        ci = seed_ci(grp[metric].dropna().astype(float).tolist())
        row[f"{metric}_ci_low"], row[f"{metric}_ci_high"] = ci.low, ci.high
        row["seeds"] = len(grp)
        rows.append(row)
    return pd.DataFrame(rows).reset_index(drop=True)


def with_item_cis(
    points: pd.DataFrame, items: dict[str, dict[str, dict[str, list]]], metric: str
) -> pd.DataFrame:
    """One seed per configuration: each point's 95% interval over its eval items (documents
    for bits per byte, resampled within tasks for ``average``) as ``{metric}_item_ci_low`` /
    ``_high``, for error bars. Points without items, and other metrics, get none."""
    task = metric.split("/")[0] if metric.endswith("/bits_per_byte") else None
    if metric != "average" and task is None:
        return points

    def interval(row: pd.Series) -> tuple[float, float]:
        scores = items.get(row["run_id"], {}).get(str(row["point"]), {})
        if task is not None:
            ci = bpb_ci(scores[task]) if scores.get(task) else None
        else:
            accs = {t: v for t, v in scores.items() if v and not isinstance(v[0], list)}
            ci = mean_over_tasks_ci(accs) if accs else None
        return (ci.low, ci.high) if ci is not None else (float("nan"), float("nan"))

    bounds = points.apply(interval, axis=1, result_type="expand")
    if bounds.empty:
        return points
    low, high = f"{metric}_item_ci_low", f"{metric}_item_ci_high"
    return points.assign(**{low: bounds[0], high: bounds[1]})
