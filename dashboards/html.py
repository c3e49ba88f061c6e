"""``report.html``: one self-contained page (plotly.js embedded once, works offline and in
MLflow's artifact view): a heading, the results table, the interactive Pareto view, each
model's depth curve, the router's depths, then every depth point. Colours, labels and error
bars are the PNGs' (``dashboards.style``, ``dashboards.plots``)."""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import pandas as pd

from dashboards.pareto import VS_FRONT, higher_is_better, pareto_front
from dashboards.plots import COST, curves, depth_columns, error_bars, routed_points
from dashboards.style import FRONT_COLOR, metric_label, metric_name, model_colors

TABLE_COLUMNS = ["model", "point", "sharing", "router", "num_recursions", "kv_cache", COST]


def _filter_buttons(meta: list[dict[str, Any]], per_model: int) -> list[dict[str, Any]]:
    """Plotly menu entries showing all models, or those of one sharing / router / N_r (the
    Pareto front, the last trace, stays visible); each model has ``per_model`` traces."""
    n = len(meta) * per_model
    buttons = [{"label": "all models", "method": "update", "args": [{"visible": [True] * (n + 1)}]}]
    for key, title in (("sharing", "sharing"), ("router", "router"), ("num_recursions", "N_r")):
        for value in sorted({m[key] for m in meta}, key=str):
            vis = [m[key] == value for m in meta for _ in range(per_model)] + [True]
            buttons.append(
                {"label": f"{title} = {value}", "method": "update", "args": [{"visible": vis}]}
            )
    return buttons


def _hover(grp: pd.DataFrame, model: str, metric: str) -> list[str]:
    return [
        f"<b>{model}</b><br>sharing={r['sharing']} router={r['router']} "
        f"N_r={r['num_recursions']} kv={r['kv_cache']}<br>point={r['point']} "
        f"FLOPs/token={r[COST]:.4g}<br>{metric}={r[metric]:.4f}{_ci_text(r, metric)}"
        for _, r in grp.iterrows()
    ]


def _curve_trace(part: pd.DataFrame, x: str, metric: str, model: str, bars: tuple | None) -> dict:
    """x, y, hover text and error bars of one model's points, one curve per trained
    configuration (each budget its own; seeds averaged), the curves kept apart by gaps."""
    groups = [g for _, g, _ in curves(part)]
    xs: list[Any] = []
    ys: list[Any] = []
    texts: list[str] = []
    plus: list[float] = []
    minus: list[float] = []
    for g in groups:
        g = g.sort_values(x)
        if xs:  # a gap: plotly does not join across it
            xs.append(None)
            ys.append(None)
            texts.append("")
            plus.append(0.0)
            minus.append(0.0)
        xs += g[x].tolist()
        ys += g[metric].tolist()
        texts += _hover(g, model, metric)
        if bars is not None:
            plus += bars[1][g.index].tolist()
            minus += bars[0][g.index].tolist()
    err = None
    if bars is not None:
        err = {"type": "data", "symmetric": False, "array": plus, "arrayminus": minus}
    return {"x": xs, "y": ys, "text": texts, "error_y": err}


def pareto_figure(points: pd.DataFrame, metric: str, colors: dict[str, str]) -> Any:
    """Per model: its fixed depths joined and the router's choice as a star of its colour
    (as in pareto.png), the front, and a menu filtering models by sharing / router / N_r."""
    import plotly.graph_objects as go

    fig, meta = go.Figure(), []
    bars = error_bars(points, metric)
    for model in sorted(points["model"].unique()):
        grp = points[points["model"] == model].sort_values(COST)
        color = colors.get(model, "black")
        for fixed in (True, False):
            part = grp[grp["fixed_depth"] == fixed]
            fig.add_trace(
                go.Scatter(
                    **_curve_trace(part, COST, metric, model, bars), name=model,
                    legendgroup=model, showlegend=fixed,
                    mode="lines+markers" if fixed else "markers", hoverinfo="text",
                    line={"color": color},
                    marker={"color": color, "symbol": "circle" if fixed else "star",
                            "size": 9 if fixed else 16, "line": {"width": 0 if fixed else 1}},
                )
            )  # fmt: skip
        meta.append({k: grp.iloc[0][k] for k in ("sharing", "router", "num_recursions")})
    front = pareto_front(points, COST, metric, higher_is_better(metric))
    fig.add_trace(
        go.Scatter(x=front[COST], y=front[metric], mode="lines", name="Pareto front",
                   line={"color": FRONT_COLOR, "width": 3, "shape": "hv"}, opacity=0.6,
                   hoverinfo="skip")
    )  # fmt: skip
    better = "higher" if higher_is_better(metric) else "lower"
    fig.update_layout(
        title=f"{metric_name(metric)} vs inference FLOPs per token (★ = router's choice)"
        + (f"<br><sub>error bars: {bars[2]}</sub>" if bars else ""),
        xaxis={"title": "inference FLOPs per token (measured routing)", "type": "log"},
        yaxis={"title": f"{metric_label(metric)}, {better} is better"},
        template="plotly_white",
        height=560,
        updatemenus=[{"buttons": _filter_buttons(meta, 2), "direction": "down", "x": 1.0,
                      "y": 1.15}],
    )  # fmt: skip
    return fig


def depth_figure(points: pd.DataFrame, metric: str, colors: dict[str, str]) -> Any | None:
    """``metric`` at each integer depth per model; the router's choice at its mean depth."""
    import plotly.graph_objects as go

    shown = points.dropna(subset=[metric])
    if shown.empty or not shown["fixed_depth"].any():
        return None
    fig, bars = go.Figure(), error_bars(shown, metric)
    for model in sorted(shown["model"].unique()):
        grp, color = shown[shown["model"] == model], colors.get(model, "black")
        fixed = grp[grp["fixed_depth"]].assign(depth=lambda g: g["point"].astype(int))
        trace = _curve_trace(fixed, "depth", metric, model, bars)
        fig.add_trace(go.Scatter(x=trace["x"], y=trace["y"], name=model, legendgroup=model,
                                 mode="lines+markers", line={"color": color},
                                 error_y=trace["error_y"]))  # fmt: skip
        routed = grp[~grp["fixed_depth"]]
        if not routed.empty and "mean_depth" in routed:
            fig.add_trace(go.Scatter(x=routed["mean_depth"], y=routed[metric], name=model,
                                     legendgroup=model, showlegend=False, mode="markers",
                                     marker={"color": color, "symbol": "star", "size": 16,
                                             "line": {"width": 1}}))  # fmt: skip
    fig.update_layout(
        title=f"{metric_name(metric)} at each test-time depth (★ = router's mean depth)",
        xaxis={"title": "test-time depth (recursions per token)", "dtick": 1},
        yaxis={"title": metric_label(metric)},
        template="plotly_white",
        height=460,
    )
    return fig


def router_figure(points: pd.DataFrame, colors: dict[str, str]) -> Any | None:
    """Fraction of tokens per depth reached at each routed model's router's choice."""
    import plotly.graph_objects as go

    cols, routed = depth_columns(points), routed_points(points)
    if routed.empty or not cols:
        return None
    fig = go.Figure()
    depths = [int(c.rsplit("_", 1)[1]) for c in cols]
    for _, row in routed.iterrows():
        fig.add_trace(go.Bar(x=depths, y=[row.get(c, 0) or 0 for c in cols], name=row["model"],
                             marker_color=colors.get(row["model"], "black")))  # fmt: skip
    fig.update_layout(
        title="Router depth distributions at each model's router's choice",
        xaxis={"title": "recursion depth reached (recursions a token ran)", "dtick": 1},
        yaxis={"title": "fraction of tokens", "range": [0, 1]},
        barmode="group",
        showlegend=True,  # even for one model: the legend names its colour
        template="plotly_white",
        height=420,
    )
    return fig


def _ci_text(row: pd.Series, metric: str) -> str:
    if f"{metric}_ci_low" not in row or pd.isna(row[f"{metric}_ci_low"]):
        return ""
    status = {"front": " (on the front)", "≈ front": " (CI overlaps the front)"}.get(
        row.get(VS_FRONT, ""), ""
    )
    return f" [95% CI {row[f'{metric}_ci_low']:.4f}, {row[f'{metric}_ci_high']:.4f}]{status}"


def _table(df: pd.DataFrame, table_id: str) -> str:
    return df.to_html(index=False, float_format=lambda v: f"{v:.4g}", table_id=table_id, border=0)


def interactive_html(
    points: pd.DataFrame,
    metric: str,
    path: Path,
    results: pd.DataFrame | None = None,
    colors: dict[str, str] | None = None,
    heading: str = "MoR sweep report",
) -> Path:
    """The report page (see the module docstring); ``results``: one row per model."""
    colors = colors or model_colors(points["model"])
    title = f"MoR sweep report: {metric_name(metric)} vs inference FLOPs per token"
    figures = [
        ("mor-pareto", "Pareto view", pareto_figure(points, metric, colors)),
        ("mor-depths", "Depth curves", depth_figure(points, metric, colors)),
        ("mor-router", "Router depths", router_figure(points, colors)),
    ]
    views = []
    for i, (div, name, fig) in enumerate(f for f in figures if f[2] is not None):
        plot = fig.to_html(include_plotlyjs=i == 0, full_html=False, div_id=div)
        views.append(f"<h2>{name}</h2>\n{plot}")
    columns = TABLE_COLUMNS + ([metric] if metric not in TABLE_COLUMNS else [])
    columns += [c for c in (f"{metric}_ci_low", f"{metric}_ci_high", VS_FRONT) if c in points]
    summary = ""
    if results is not None and not results.empty:
        shown = results.drop(columns=["run_id"], errors="ignore")
        summary = "<h2>Results per model</h2>\n" + _table(shown, "mor-results")
    page = f"""<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:1.5em}} table{{border-collapse:collapse;font-size:12px}}
td,th{{padding:2px 8px;text-align:right}} tr:nth-child(even){{background:#f4f4f4}}</style></head>
<body>
<h1>{html.escape(heading)}</h1>
<p>{html.escape(title)}. Colours name the same model in every view; the Pareto front is red.</p>
{summary}
{chr(10).join(views)}
<h2>Every model at every test-time depth</h2>
{_table(points.sort_values(["model", COST])[columns], "mor-points")}
</body>
</html>
"""
    path.write_text(page)
    return path
