"""Pictures of a sweep (PNG at 200 dpi and SVG): the Pareto front, each model's depth curve,
the iso-FLOP view and the router's depths. Every figure takes the report's ``colors`` (one
per model, ``dashboards.style``), so a model looks the same everywhere; the front is drawn in
a colour no model has."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from dashboards.pareto import VS_FRONT, higher_is_better, pareto_front
from dashboards.style import FRONT_COLOR, flops_axis, metric_label, metric_name, model_colors, save

COST = "flops_per_token"
Z95 = 1.96  # a standard error → the half-width of a normal 95% interval


def error_bars(points: pd.DataFrame, metric: str) -> tuple[pd.Series, pd.Series, str] | None:
    """(below, above, what) for ``metric``'s error bars: the 95% interval across seeds where
    the points have one, else the bootstrap interval over the eval's items
    (``dashboards.replicates.with_item_cis``), else ±1.96 of lm-eval's standard error; None
    where none exists."""
    low, high, stderr = f"{metric}_ci_low", f"{metric}_ci_high", f"{metric}_stderr"
    if low in points and points[low].notna().any():
        return points[metric] - points[low], points[high] - points[metric], "95% CI over seeds"
    low, high = f"{metric}_item_ci_low", f"{metric}_item_ci_high"
    if low in points and points[low].notna().any():
        return points[metric] - points[low], points[high] - points[metric], "95% CI over items"
    if stderr in points and points[stderr].notna().any():
        half = points[stderr] * Z95
        return half, half, "95% CI (±1.96 standard errors)"
    return None


def pareto_png(
    points: pd.DataFrame, metric: str, path: Path, colors: dict[str, str] | None = None
) -> Path:
    """Every model's depth curve (fixed depths joined, router's choice as a star of the same
    colour), the front; a second panel for average accuracy when the headline is another."""
    colors = colors or model_colors(points["model"])
    panels = [metric]
    if metric != "average" and "average" in points and points["average"].notna().any():
        panels.append("average")
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    for ax, m in zip(axes[0], panels, strict=True):
        _pareto_axis(ax, points.dropna(subset=[m]), m, colors)
    fig.tight_layout()
    return save(fig, path)


def curves(points: pd.DataFrame) -> Iterator[tuple[str, pd.DataFrame, str | None]]:
    """(model, its points, legend label) per curve: one curve per trained configuration (a
    model at each training budget is a curve of its own: joining budgets would zigzag), its
    seeds already averaged; the legend names each model once. The HTML report draws the same
    curves (``dashboards.html``)."""
    key = next((k for k in ("replicate_of", "run_id") if k in points), "model")
    named: set[str] = set()
    for (model, _), grp in points.groupby(["model", key], sort=True):
        yield model, grp, None if model in named else model
        named.add(model)


def _pareto_axis(ax: Any, points: pd.DataFrame, metric: str, colors: dict[str, str]) -> None:
    bars = error_bars(points, metric)
    for model, grp, label in curves(points):
        color = colors.get(model, "black")
        fixed = grp[grp["fixed_depth"]].sort_values(COST)
        ax.plot(fixed[COST], fixed[metric], "o-", color=color, alpha=0.85, label=label)
        if bars is not None:
            ax.errorbar(grp[COST], grp[metric], yerr=[bars[0][grp.index], bars[1][grp.index]],
                        fmt="none", ecolor=color, alpha=0.6, capsize=3)  # fmt: skip
        for _, row in fixed.iterrows():
            ax.annotate(f"d{row['point']}", (row[COST], row[metric]), fontsize=7,
                        textcoords="offset points", xytext=(3, 3), color=color)  # fmt: skip
        routed = grp[~grp["fixed_depth"]]
        ax.plot(routed[COST], routed[metric], "*", ms=13, color=color, mec="black", mew=0.5)
    front = pareto_front(points, COST, metric, higher_is_better(metric))
    ax.step(front[COST], front[metric], where="post", color=FRONT_COLOR, lw=2, alpha=0.6,
            label="Pareto front")  # fmt: skip
    ax.scatter(front[COST], front[metric], s=120, facecolors="none", edgecolors=FRONT_COLOR, lw=1.5)
    near = points[points[VS_FRONT] == "≈ front"] if VS_FRONT in points else points.iloc[:0]
    if not near.empty:  # a CI that reaches the front: not distinguishable from it
        ax.scatter(near[COST], near[metric], s=160, marker="D", facecolors="none",
                   edgecolors="black", lw=1.2, label="CI overlaps the front")  # fmt: skip
    flops_axis(ax, points[COST])
    ax.set_xlabel("inference FLOPs per token (measured routing)")
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_ylabel(f"{metric_label(metric)}, {better} is better")
    title = "Every model at every test-time depth (★ = router's choice)"
    ax.set_title(title + (f"\nerror bars: {bars[2]}" if bars else ""), fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")


def depth_curves_png(
    points: pd.DataFrame, metric: str, path: Path, colors: dict[str, str] | None = None
) -> Path | None:
    """``metric`` against test-time depth per model (integer depths; the router's choice as a
    star at its mean depth): what each extra recursion buys. None without fixed depths."""
    shown = points.dropna(subset=[metric])
    if shown.empty or not shown["fixed_depth"].any():
        return None
    colors = colors or model_colors(shown["model"])
    bars = error_bars(shown, metric)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, grp, label in curves(shown):
        color = colors.get(model, "black")
        fixed = grp[grp["fixed_depth"]].assign(depth=lambda g: g["point"].astype(int))
        fixed = fixed.sort_values("depth")
        ax.plot(fixed["depth"], fixed[metric], "o-", color=color, label=label)
        if bars is not None:
            ax.errorbar(fixed["depth"], fixed[metric], fmt="none", ecolor=color, alpha=0.6,
                        capsize=3, yerr=[bars[0][fixed.index], bars[1][fixed.index]])  # fmt: skip
        routed = grp[~grp["fixed_depth"]]
        if "mean_depth" in routed:
            ax.plot(routed["mean_depth"], routed[metric], "*", ms=13, color=color,
                    mec="black", mew=0.5)  # fmt: skip
    depths = sorted({int(p) for p in shown.loc[shown["fixed_depth"], "point"]})
    ax.set_xticks(range(1, max(depths) + 1))
    ax.set_xlim(0.5, max(depths) + 0.5)
    ax.set_xlabel("test-time depth (recursions per token; ★ at the router's mean depth)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(f"{metric_name(metric)} at each depth" + (f"; bars: {bars[2]}" if bars else ""),
                 fontsize=10)  # fmt: skip
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path)


def iso_flop_png(trials: pd.DataFrame, path: Path, colors: dict[str, str] | None = None) -> Path:
    """Training FLOPs vs held-out NLL per trial (the paper's iso-FLOP comparison)."""
    colors = colors or model_colors(trials["model"])
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = trials.dropna(subset=["train_flops", "val_nll"]).sort_values("model")
    for _, row in ok.iterrows():
        color = colors.get(row["model"], "black")
        stopped = pd.notna(row.get("stopped_early_at_flops"))
        # A trial ASHA stopped is a partial point (hollow): its loss at less compute.
        ax.scatter(row["train_flops"], row["val_nll"], color=color, s=40,
                   facecolors="none" if stopped else color,
                   label=row["model"] + (" (stopped early)" if stopped else ""))  # fmt: skip
    if ok.empty:  # e.g. runs logged without validation: say so, no empty 0..1 axes
        ax.text(0.5, 0.5, "no trial logged a validation NLL", ha="center", transform=ax.transAxes)
        ax.set_xticks([]), ax.set_yticks([])
    else:
        flops_axis(ax, ok["train_flops"])
    ax.set_xlabel("training FLOPs (total, per trial)")
    ax.set_ylabel(metric_label("val_nll"))
    ax.set_title("Iso-FLOP view: lower is better at equal training compute", fontsize=10)
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles, strict=True))  # seeds: one legend entry per model
    if unique:
        ax.legend(unique.values(), unique.keys(), fontsize=7, loc="best")
    fig.tight_layout()
    return save(fig, path)


def depth_columns(points: pd.DataFrame) -> list[str]:
    """The ``frac_depth_K`` columns, by K; depth 0 only where a routed model sends tokens
    there (expert-choice's first recursion usually keeps them all: an empty slot otherwise)."""
    cols = [c for c in points.columns if c.startswith("frac_depth_")]
    cols = sorted(cols, key=lambda c: int(c.rsplit("_", 1)[1]))
    if cols and cols[0] == "frac_depth_0" and {"fixed_depth", "router"} <= set(points.columns):
        if not (routed_points(points)[cols[0]].fillna(0) > 0).any():
            cols = cols[1:]
    return cols


def routed_points(points: pd.DataFrame) -> pd.DataFrame:
    """Each routed model's router's-choice point (one per model: seeds averaged upstream)."""
    return points[(~points["fixed_depth"]) & points["router"].ne("none")].sort_values("model")


def router_depths_png(
    points: pd.DataFrame, path: Path, colors: dict[str, str] | None = None
) -> Path | None:
    """Tokens-per-depth distribution of each routed model at its router's choice: one bar
    per model at each depth, the group centred on its integer depth."""
    cols, routed = depth_columns(points), routed_points(points)
    if routed.empty or not cols:
        return None
    colors = colors or model_colors(routed["model"])
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(routed)
    depths = [int(c.rsplit("_", 1)[1]) for c in cols]
    for i, (_, row) in enumerate(routed.iterrows()):
        offset = (i - (len(routed) - 1) / 2) * width
        ax.bar([d + offset for d in depths], [row.get(c, 0) or 0 for c in cols], width=width,
               label=row["model"], color=colors.get(row["model"], "black"))  # fmt: skip
    ax.set_xticks(depths)
    ax.set_xlabel("recursion depth reached (recursions a token ran)")
    ax.set_ylabel("fraction of tokens")
    ax.set_ylim(0, 1)
    ax.set_title("Router depth distributions at each model's router's choice", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    return save(fig, path)
