"""Pictures of a sweep: Pareto front (PNG and interactive HTML), iso-FLOP view, router depths."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import pandas as pd

from dashboards.pareto import VS_FRONT, higher_is_better, pareto_front

COST = "flops_per_token"


def _metric_label(metric: str) -> str:
    return "average accuracy" if metric == "average" else metric


def pareto_png(points: pd.DataFrame, metric: str, path: Path) -> Path:
    """Every model's depth curve (fixed depths joined, router's choice as a star), front in
    red; a second panel for average accuracy when the headline metric is another one."""
    panels = [metric]
    if metric != "average" and "average" in points and points["average"].notna().any():
        panels.append("average")
    fig, axes = plt.subplots(1, len(panels), figsize=(8 * len(panels), 5.5), squeeze=False)
    for ax, m in zip(axes[0], panels, strict=True):
        _pareto_axis(ax, points.dropna(subset=[m]), m)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _pareto_axis(ax: Any, points: pd.DataFrame, metric: str) -> None:
    cmap = plt.get_cmap("tab10")
    for i, (model, grp) in enumerate(points.groupby("model", sort=True)):
        color = cmap(i % 10)
        fixed = grp[grp["fixed_depth"]].sort_values(COST)
        ax.plot(fixed[COST], fixed[metric], "o-", color=color, alpha=0.8, label=model)
        if f"{metric}_ci_low" in grp:  # seeds: the 95% CI across them
            ax.errorbar(
                grp[COST],
                grp[metric],
                yerr=[
                    grp[metric] - grp[f"{metric}_ci_low"],
                    grp[f"{metric}_ci_high"] - grp[metric],
                ],
                fmt="none",
                ecolor=color,
                alpha=0.6,
                capsize=3,
            )
        for _, row in fixed.iterrows():
            ax.annotate(
                f"d{row['point']}",
                (row[COST], row[metric]),
                fontsize=7,
                textcoords="offset points",
                xytext=(3, 3),
                color=color,
            )
        routed = grp[~grp["fixed_depth"]]
        ax.plot(routed[COST], routed[metric], "*", ms=13, color=color)
    front = pareto_front(points, COST, metric, higher_is_better(metric))
    ax.step(
        front[COST], front[metric], where="post", color="red", lw=2, alpha=0.6, label="Pareto front"
    )
    ax.scatter(front[COST], front[metric], s=120, facecolors="none", edgecolors="red", lw=1.5)
    if VS_FRONT in points:  # a CI that reaches the front: not distinguishable from it
        near = points[points[VS_FRONT] == "≈ front"]
        ax.scatter(near[COST], near[metric], s=160, marker="D", facecolors="none",
                   edgecolors="orange", lw=1.5, label="CI overlaps the front")  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("inference FLOPs per token (measured routing)")
    better = "higher" if higher_is_better(metric) else "lower"
    ax.set_ylabel(f"{_metric_label(metric)} ({better} is better)")
    ax.set_title("Every model at every test-time depth (★ = router's choice)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")


def iso_flop_png(trials: pd.DataFrame, path: Path) -> Path:
    """Training FLOPs vs held-out NLL per trial (the paper's iso-FLOP comparison)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ok = trials.dropna(subset=["train_flops", "val_nll"])
    for i, (_, row) in enumerate(ok.iterrows()):
        color = plt.get_cmap("tab10")(i % 10)
        stopped = pd.notna(row.get("stopped_early_at_flops"))
        # A trial ASHA stopped is a partial point (hollow): its loss at less compute.
        ax.scatter(
            row["train_flops"], row["val_nll"], color=color, facecolors="none" if stopped else color
        )
        ax.annotate(
            row["model"] + (" (stopped early)" if stopped else ""),
            (row["train_flops"], row["val_nll"]),
            fontsize=7,
            textcoords="offset points",
            xytext=(4, 2),
        )
    ax.set_xlabel("training FLOPs")
    ax.set_ylabel("validation NLL")
    ax.set_title("Iso-FLOP view: lower is better at equal training compute")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def router_depths_png(points: pd.DataFrame, path: Path) -> Path | None:
    """Tokens-per-depth distribution of each routed model at its router's choice."""
    cols = sorted(
        (c for c in points.columns if c.startswith("frac_depth_")),
        key=lambda c: int(c.rsplit("_", 1)[1]),
    )
    routed = points[(~points["fixed_depth"]) & points["router"].ne("none")]
    if routed.empty or not cols:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / len(routed)
    for i, (_, row) in enumerate(routed.iterrows()):
        xs = [int(c.rsplit("_", 1)[1]) + i * width for c in cols]
        ax.bar(xs, [row.get(c, 0) or 0 for c in cols], width=width, label=row["model"])
    ax.set_xlabel("recursion depth reached")
    ax.set_ylabel("fraction of tokens")
    ax.set_title("Router depth distributions across the sweep")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _filter_buttons(meta: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Plotly menu entries showing all models, or those of one sharing / router / N_r (the
    Pareto front, the last trace, stays visible)."""
    n = len(meta)
    buttons = [{"label": "all models", "method": "update", "args": [{"visible": [True] * (n + 1)}]}]
    for key, title in (("sharing", "sharing"), ("router", "router"), ("num_recursions", "N_r")):
        for value in sorted({m[key] for m in meta}, key=str):
            vis = [m[key] == value for m in meta] + [True]
            buttons.append(
                {"label": f"{title} = {value}", "method": "update", "args": [{"visible": vis}]}
            )
    return buttons


def _pareto_figure(points: pd.DataFrame, metric: str) -> Any:
    """The Plotly figure: one depth curve per model (router's choice as a star), the Pareto
    front, and a menu filtering models by sharing / router / N_r."""
    import plotly.graph_objects as go

    fig = go.Figure()
    models = sorted(points["model"].unique())
    meta = []
    for model in models:
        grp = points[points["model"] == model].sort_values(
            ["fixed_depth", COST], ascending=[False, True]
        )
        first = grp.iloc[0]
        hover = [
            f"<b>{model}</b><br>sharing={r['sharing']} router={r['router']} "
            f"N_r={r['num_recursions']} kv={r['kv_cache']}<br>point={r['point']} "
            f"FLOPs/token={r[COST]:.4g}<br>{metric}={r[metric]:.4f}{_ci_text(r, metric)}"
            for _, r in grp.iterrows()
        ]
        fig.add_trace(
            go.Scatter(
                x=grp[COST],
                y=grp[metric],
                mode="lines+markers",
                name=model,
                text=hover,
                hoverinfo="text",
                marker={
                    "symbol": ["circle" if f else "star" for f in grp["fixed_depth"]],
                    "size": [9 if f else 15 for f in grp["fixed_depth"]],
                },
                error_y=_error_bars(grp, metric),
            )
        )
        meta.append({k: first[k] for k in ("sharing", "router", "num_recursions")})
    front = pareto_front(points, COST, metric, higher_is_better(metric))
    fig.add_trace(
        go.Scatter(
            x=front[COST],
            y=front[metric],
            mode="lines",
            name="Pareto front",
            line={"color": "red", "width": 3, "shape": "hv"},
            opacity=0.5,
            hoverinfo="skip",
        )
    )
    buttons = _filter_buttons(meta)
    fig.update_layout(
        title=f"{_metric_label(metric)} vs inference FLOPs per token (★ = router's choice)",
        xaxis={"title": "inference FLOPs per token", "type": "log"},
        yaxis={"title": _metric_label(metric)},
        template="plotly_white",
        height=600,
        updatemenus=[{"buttons": buttons, "direction": "down", "x": 1.0, "y": 1.15}],
    )
    return fig


def _error_bars(grp: pd.DataFrame, metric: str) -> dict[str, Any] | None:
    """Plotly error bars from the 95% interval columns (seeds), if any."""
    if f"{metric}_ci_low" not in grp:
        return None
    return {
        "type": "data",
        "symmetric": False,
        "array": (grp[f"{metric}_ci_high"] - grp[metric]).tolist(),
        "arrayminus": (grp[metric] - grp[f"{metric}_ci_low"]).tolist(),
    }


def _ci_text(row: pd.Series, metric: str) -> str:
    if f"{metric}_ci_low" not in row or pd.isna(row[f"{metric}_ci_low"]):
        return ""
    status = {"front": " (on the front)", "≈ front": " (CI overlaps the front)"}.get(
        row.get(VS_FRONT, ""), ""
    )
    return f" [95% CI {row[f'{metric}_ci_low']:.4f}, {row[f'{metric}_ci_high']:.4f}]{status}"


TABLE_COLUMNS = ["model", "point", "sharing", "router", "num_recursions", "kv_cache", COST]


def interactive_html(
    points: pd.DataFrame, metric: str, path: Path, results: pd.DataFrame | None = None
) -> Path:
    """The report page: the interactive Pareto plot (hover shows the configuration, front
    highlighted, filters by sharing / router / N_r), the results table (one row per model:
    its mean depth beside its routing drift), then the table of its depth points.
    Self-contained (plotly.js embedded): works offline."""
    title = f"MoR sweep report: {_metric_label(metric)} vs inference FLOPs per token"
    plot = _pareto_figure(points, metric).to_html(
        include_plotlyjs=True, full_html=False, div_id="mor-pareto"
    )
    columns = TABLE_COLUMNS + ([metric] if metric not in TABLE_COLUMNS else [])
    columns += [c for c in (f"{metric}_ci_low", f"{metric}_ci_high", VS_FRONT) if c in points]
    table = points.sort_values(["model", COST])[columns].to_html(
        index=False, float_format=lambda v: f"{v:.4g}", table_id="mor-points", border=0
    )
    summary = ""
    if results is not None and not results.empty:
        shown = results.drop(columns=["run_id"], errors="ignore")
        summary = "<h2>Results per model</h2>\n" + shown.to_html(
            index=False, float_format=lambda v: f"{v:.4g}", table_id="mor-results", border=0
        )
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title></head>
<body>
<h1>{html.escape(title)}</h1>
{plot}
{summary}
<h2>Every model at every test-time depth</h2>
{table}
</body>
</html>
"""
    path.write_text(page)
    return path
