"""`mor report`: from MLflow runs to the paper's pictures and table, on disk and in MLflow."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from core.keys import ROUTER_POINT, TOPK_POINT
from dashboards.html import interactive_html
from dashboards.pareto import VS_FRONT, front_status, higher_is_better, pareto_front
from dashboards.plots import COST, depth_curves_png, iso_flop_png, pareto_png, router_depths_png
from dashboards.replicates import aggregate_points, by_config, has_replicates, with_item_cis
from dashboards.runs import SweepRuns, load_runs
from dashboards.stats import (
    Diff,
    bpb_ci,
    mean_over_tasks_ci,
    paired_bpb_diff_ci,
    paired_diff_ci,
)
from dashboards.style import model_colors

DELTA = "Δ vs vanilla (95% CI)"
SIGNIFICANT = "significant?"
DELTA_BPB = "Δ bpb vs vanilla (95% CI)"
SIGNIFICANT_BPB = "bpb significant?"


@dataclass
class Report:
    out_dir: Path
    files: list[Path]
    table: pd.DataFrame  # one row per trial
    front: pd.DataFrame  # the Pareto-optimal depth points
    parent_run_ids: list[str] = field(default_factory=list)
    front_models: dict[str, int] = field(default_factory=dict)
    """Per training budget as trial labels write it ('2e+09'; '' for unlabelled runs): how
    many models (configurations, seeds pooled) are on that budget's own front of inference
    FLOPs vs the metric. The sweep driver logs these on the parent run."""


def native_points(points: pd.DataFrame) -> pd.DataFrame:
    """Each model's own operating point: the router's choice, else its full depth."""
    rows = []
    for _, grp in points.groupby("run_id"):
        routed = grp[grp["point"] == ROUTER_POINT]
        if not routed.empty:
            rows.append(routed.iloc[0])
        else:
            rows.append(grp.sort_values(COST).iloc[-1])
    return pd.DataFrame(rows)


def causality_gap(points: pd.DataFrame, metric: str) -> pd.Series:
    """Per run: ``metric`` at the causal router's point minus at the non-causal top-k point
    (the paper's evaluation); NaN where either is missing."""
    if metric not in points.columns:
        return pd.Series(dtype=float)
    by = points.pivot_table(index="run_id", columns="point", values=metric, aggfunc="first")
    if ROUTER_POINT not in by.columns or TOPK_POINT not in by.columns:
        return pd.Series(dtype=float)
    return by[ROUTER_POINT] - by[TOPK_POINT]


def results_table(runs: SweepRuns, metric: str = "average") -> pd.DataFrame:
    """Like the paper's main table: params, training FLOPs, tokens, NLL, accuracy per task."""
    trials = runs.trials
    if trials.empty:
        return trials
    cols = [
        "model",
        "sharing",
        "router",
        "num_recursions",
        "kv_cache",
        "params_non_embedding",
        "train_flops",
        "tokens",
        "val_nll",
    ]
    table = trials[cols].copy()
    table.insert(0, "run_id", trials["run_id"])
    if "stopped_early_at_flops" in trials and trials["stopped_early_at_flops"].notna().any():
        table.insert(2, "status", trials["stopped_early_at_flops"].map(_status))
    if not runs.points.empty:
        native = native_points(runs.points).set_index("run_id")
        acc_cols = sorted(
            c
            for c in native.columns
            if c.endswith(("/acc_norm", "/acc")) and not c.endswith("_stderr")
        )
        # One accuracy per task: acc_norm where the task defines it (paper convention).
        per_task: dict[str, str] = {}
        for c in acc_cols:
            task = c.rsplit("/", 1)[0]
            if task not in per_task or c.endswith("acc_norm"):
                per_task[task] = c
        for task, c in sorted(per_task.items()):
            table[task] = table["run_id"].map(native[c])
        headline = [] if metric in ("average", *per_task.values()) else [metric]
        for extra in (*headline, "average", COST, "mean_depth"):
            if extra in native.columns:
                table[extra] = table["run_id"].map(native[extra])
    # Beside the mean depth: did the router run at inference what it trained for? (#14)
    for extra in ("drift_max_gap", "drift_min_agree", "spearman_depth_loss"):
        if extra in trials.columns and trials[extra].notna().any():
            table[extra] = trials[extra]
    if not runs.points.empty and (runs.points["point"] == TOPK_POINT).any():
        table["causality_gap"] = table["run_id"].map(causality_gap(runs.points, metric))
    table = with_uncertainty(table, runs)
    return table.sort_values(["sharing", "num_recursions", "router"], na_position="first")


def native_items(runs: SweepRuns) -> dict[str, dict[str, list[float]]]:
    """Per training run: the per-item scores (task → scores) at its native point."""
    if runs.points.empty:
        return {}
    native = native_points(runs.points).set_index("run_id")["point"]
    out = {}
    for run_id, point in native.items():
        items = runs.items.get(run_id, {}).get(str(point))
        if items:
            out[run_id] = items
    return out


def _label_part(label: object, key: str) -> str | None:
    """``budget``/``seed`` of a sweep trial's label, e.g. 'mor-ec,budget=6e+09' → '6e+09'."""
    match = re.search(rf"(?:^|,){key}=([^,]+)", label) if isinstance(label, str) else None
    return match[1] if match else None


def vanilla_of(trials: pd.DataFrame) -> dict[str, str]:
    """Per non-vanilla training run: the vanilla run to compare with, one of the same
    training budget (from the trial label; unlabelled runs pair with unlabelled ones),
    preferring the same seed where labels carry one. Runs without one are left out."""
    rows = trials.assign(
        budget=trials["label"].map(lambda v: _label_part(v, "budget")),
        seed=trials["label"].map(lambda v: _label_part(v, "seed")),
        vanilla=trials["sharing"].isna() | (trials["sharing"] == "none"),
    ).sort_values("run_id")
    vanillas = rows[rows["vanilla"]]
    out = {}
    for row in rows[~rows["vanilla"]].itertuples():
        same = vanillas[vanillas["budget"].fillna("") == (row.budget or "")]
        seeded = same[same["seed"] == row.seed] if row.seed is not None else same.iloc[:0]
        pick = seeded if not seeded.empty else same
        if not pick.empty:
            out[row.run_id] = pick["run_id"].iloc[0]
    return out


def with_uncertainty(table: pd.DataFrame, runs: SweepRuns) -> pd.DataFrame:
    """``avg_ci_low``/``avg_ci_high`` (item bootstrap of each model's average accuracy at its
    native point) beside ``average``, then every model's paired-bootstrap difference to the
    vanilla model of its budget on the same items and whether it is significant at 95%
    (``dashboards.stats``). Cells stay empty where items or a vanilla are missing."""
    everything = native_items(runs)
    items = {rid: _accuracy_items(v) for rid, v in everything.items()}
    cis = {rid: mean_over_tasks_ci(v) for rid, v in items.items()}
    diffs: dict[str, Diff] = {}
    for rid, base in vanilla_of(runs.trials).items():
        if rid in items and base in items:
            try:
                diff = paired_diff_ci(items[rid], items[base])
            except ValueError:  # scored on other items (another limit): no paired test
                continue
            if not math.isnan(diff.mean):  # NaN: no task in common
                diffs[rid] = diff
    at = table.columns.get_loc("average") + 1 if "average" in table.columns else len(table.columns)
    for offset, (col, part) in enumerate((("avg_ci_low", 1), ("avg_ci_high", 2))):
        table.insert(at + offset, col, table["run_id"].map(lambda r, p=part: _ci_part(cis, r, p)))
    table[DELTA] = table["run_id"].map(lambda r: _fmt_diff(diffs.get(r)))
    table[SIGNIFICANT] = table["run_id"].map(
        lambda r: "" if r not in diffs else ("yes" if diffs[r].significant else "no")
    )
    return with_bpb_uncertainty(table, everything, vanilla_of(runs.trials))


def _accuracy_items(items: dict[str, list]) -> dict[str, list[float]]:
    return {t: v for t, v in items.items() if v and not isinstance(v[0], list)}


def _bpb_items(items: dict[str, list]) -> dict[str, list[list[float]]]:
    return {t: v for t, v in items.items() if v and isinstance(v[0], list)}


def with_bpb_uncertainty(
    table: pd.DataFrame, items: dict[str, dict[str, list]], vanilla: dict[str, str]
) -> pd.DataFrame:
    """For the first bits-per-byte task: each model's document-bootstrap interval
    (``bpb_ci_low``/``_high``) and its paired difference to its vanilla on the same documents
    (``Δ bpb vs vanilla (95% CI)``; negative is better) with ``bpb significant?``."""
    tasks = sorted({t for v in items.values() for t in _bpb_items(v)})
    if not tasks:
        return table
    task = tasks[0]
    pairs = {rid: v[task] for rid, v in items.items() if task in v}
    cis = {rid: bpb_ci(p) for rid, p in pairs.items()}
    diffs = {}
    for rid, base in vanilla.items():
        if rid in pairs and base in pairs:
            try:
                diffs[rid] = paired_bpb_diff_ci(pairs[rid], pairs[base])
            except ValueError:  # other documents (another limit): no paired test
                continue
    table["bpb_ci_low"] = table["run_id"].map(lambda r: _ci_part(cis, r, 1))
    table["bpb_ci_high"] = table["run_id"].map(lambda r: _ci_part(cis, r, 2))
    table[DELTA_BPB] = table["run_id"].map(lambda r: _fmt_diff(diffs.get(r)))
    table[SIGNIFICANT_BPB] = table["run_id"].map(
        lambda r: "" if r not in diffs else ("yes" if diffs[r].significant else "no")
    )
    return table


def _status(rung: object) -> str:
    """A trial's status column: finished, or where ASHA stopped it (a partial point)."""
    if isinstance(rung, float) and not math.isnan(rung):
        return f"stopped early at {rung:.3g} FLOPs (partial)"
    return "finished"


def front_models_by_budget(
    points: pd.DataFrame, trials: pd.DataFrame, metric: str
) -> dict[str, int]:
    """Per training budget (from the trial labels): the number of models on the Pareto front
    of that budget's depth points (``points``: causal, seeds pooled, as the figures draw)."""
    budgets = trials.set_index("run_id")["label"].map(lambda v: _label_part(v, "budget"))
    pts = points.assign(budget=points["run_id"].map(budgets).fillna(""))
    out = {}
    for budget, grp in pts.groupby("budget"):
        front = pareto_front(grp, COST, metric, higher_is_better(metric))
        out[str(budget)] = int(front["replicate_of"].nunique())
    return out


def best_line(tracking_uri: str, parent_run_ids: list[str]) -> str:
    """The searcher's best trial as the sweeps recorded it on their parent runs ('' if none)."""
    from mlflow import MlflowClient

    from core.keys import TAG_BEST_LABEL

    client, lines = MlflowClient(tracking_uri), []
    for rid in parent_run_ids:
        run = client.get_run(rid)
        label = run.data.tags.get(TAG_BEST_LABEL)
        if not label:
            continue
        config = {k[len("mor.best.") :]: v for k, v in run.data.tags.items()
                  if k.startswith("mor.best.")}  # fmt: skip
        metric = next((k for k in run.data.metrics if k.startswith("best/")), None)
        value = f" {metric[5:]} = {run.data.metrics[metric]:.4g}" if metric else ""
        drawn = f" {config}" if config else ""  # the sampled values, when a search drew them
        lines.append(f"Best trial of {run.info.run_name}: {label}{drawn}{value}")
    return "\n".join(f"**{ln}**\n" for ln in lines)


def _ci_part(cis: dict, run_id: str, part: int) -> float:
    ci = cis.get(run_id)
    return float(ci[part]) if ci is not None else math.nan


def _fmt_diff(diff: Diff | None) -> str:
    if diff is None or math.isnan(diff.mean):
        return ""
    return f"{diff.mean:+.3f} [{diff.low:+.3f}, {diff.high:+.3f}]"


def headline_of(tracking_uri: str, parent_run_ids: list[str]) -> str:
    """The ``headline`` the sweeps were run with, if they agree; else 'average'."""
    if not parent_run_ids:
        return "average"
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    found = {client.get_run(r).data.params.get("headline", "average") for r in parent_run_ids}
    return found.pop() if len(found) == 1 else "average"


def _markdown(table: pd.DataFrame) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.4g}"
        return "" if v is None else str(v)

    shown = table.drop(columns=["run_id"], errors="ignore")
    head = "| " + " | ".join(shown.columns) + " |"
    sep = "| " + " | ".join("---" for _ in shown.columns) + " |"
    body = ["| " + " | ".join(fmt(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    return "\n".join([head, sep, *body]) + "\n"


def build_report(
    tracking_uri: str,
    names: list[str],
    out_dir: str | Path,
    metric: str | None = None,
    log_to_mlflow: bool = True,
) -> Report:
    """Read the sweeps/experiments ``names`` and write plots and tables to ``out_dir``.

    ``metric`` ranks the models (default: the sweeps' ``headline``, else 'average')."""
    runs = load_runs(tracking_uri, names)
    if runs.trials.empty:
        raise ValueError(f"no training runs found for {names} at {tracking_uri}")
    metric = metric or headline_of(tracking_uri, runs.parent_run_ids)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    table = results_table(runs, metric)
    best = best_line(tracking_uri, runs.parent_run_ids)
    (out / "results.md").write_text((best + "\n" if best else "") + _markdown(table))
    table.to_csv(out / "results.csv", index=False)
    files += [out / "results.md", out / "results.csv"]
    summary = table
    if has_replicates(runs.trials):  # seeds: each configuration's mean and 95% CI
        summary = by_config(table, runs.trials, metric)
        (out / "results_by_config.md").write_text(_markdown(summary))
        summary.to_csv(out / "results_by_config.csv", index=False)
        files += [out / "results_by_config.md", out / "results_by_config.csv"]
    colors = model_colors(runs.trials["model"])  # one colour per model in every figure
    figures = [iso_flop_png(runs.trials, out / "iso_flop.png", colors)]
    front, front_models = pd.DataFrame(), {}
    if not runs.points.empty:
        if metric not in runs.points.columns:
            choices = sorted(
                c
                for c in runs.points.columns
                if c in ("average", "nll") or "/acc" in c or c.endswith("/bits_per_byte")
            )
            raise ValueError(f"--metric: {metric!r} was not logged; choose from {choices}")
        runs.points.to_csv(out / "points.csv", index=False)
        causal = runs.points[runs.points["causal"]]  # no non-causal top-k point on a front
        points = aggregate_points(causal.dropna(subset=[metric]), metric)
        if not has_replicates(runs.trials):  # one seed: error bars from the eval's items
            points = with_item_cis(points, runs.items, metric)
        points[VS_FRONT] = front_status(points, COST, metric, higher_is_better(metric))
        front = pareto_front(points, COST, metric, higher_is_better(metric))
        front_models = front_models_by_budget(points, runs.trials, metric)
        front.to_csv(out / "front.csv", index=False)
        files += [out / "points.csv", out / "front.csv"]
        figures.append(pareto_png(points, metric, out / "pareto.png", colors))
        figures.append(depth_curves_png(points, metric, out / "depth_curves.png", colors))
        figures.append(router_depths_png(points, out / "router_depths.png", colors))
        heading = f"MoR sweep report: {', '.join(names)}"
        files.append(
            interactive_html(points, metric, out / "report.html", summary, colors, heading)
        )
    for png in (f for f in figures if f is not None):  # each figure as PNG and SVG
        files += [png, png.with_suffix(".svg")]
    if log_to_mlflow and runs.parent_run_ids:
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri)
        for parent in runs.parent_run_ids:
            for f in files:
                client.log_artifact(parent, str(f), artifact_path="report")
    return Report(out, files, table, front, runs.parent_run_ids, front_models)
