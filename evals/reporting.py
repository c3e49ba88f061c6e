"""Results of an evaluation as files and MLflow records: tables, the depth curve, router maps."""

from __future__ import annotations

import contextlib
import html
import json
import tempfile
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import pandas as pd
import torch

from core.keys import (
    ARTIFACT_ITEMS,
    KIND_EVAL,
    PARAM_EVAL_POINTS,
    TAG_EVAL_RUN_ID,
    TAG_KIND,
    eval_key,
    eval_point_key,
)
from core.system_metrics import log_samples
from evals.routing_analysis import RoutingAnalysis
from evals.runner import EvalReport
from mor.model import MoRModel


def write_tables(report: EvalReport, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    csv, js, items = out / "results.csv", out / "results.json", out / ARTIFACT_ITEMS
    pd.DataFrame(report.rows()).to_csv(csv, index=False)
    js.write_text(json.dumps(report.to_dict(), indent=2, default=str))
    items.write_text(json.dumps(report.items_dict()))
    return [csv, js, items]


def plot_depth_curve(report: EvalReport, path: Path) -> Path:
    """Inference FLOPs per token vs average accuracy and NLL: the fixed depths as a line, the
    router's own choice as a star."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    fixed = sorted((p for p in report.points if p.depth is not None), key=lambda p: p.depth)
    routed = [p for p in report.points if p.depth is None]
    for ax, key, label in (
        (axes[0], "average", "average accuracy"),
        (axes[1], "nll", "held-out NLL"),
    ):
        if all(getattr(p, key) is None for p in report.points):
            ax.set_visible(False)
            continue
        pts = [p for p in fixed if getattr(p, key) is not None]
        ax.plot(
            [p.flops_per_token for p in pts],
            [getattr(p, key) for p in pts],
            "o-",
            color="tab:blue",
            label="fixed depth",
        )
        for p in pts:
            ax.annotate(
                f"d={p.label}",
                (p.flops_per_token, getattr(p, key)),
                textcoords="offset points",
                xytext=(4, 4),
            )
        for p in routed:
            if getattr(p, key) is not None:
                ax.plot(
                    p.flops_per_token,
                    getattr(p, key),
                    "*",
                    ms=14,
                    color="tab:orange",
                    label=f"router (mean depth {p.mean_depth:.2f})",
                )
        ax.set_xlabel("inference FLOPs per token")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    name = report.meta.get("run_name") or Path(report.model).parent.name or report.model
    fig.suptitle(f"Compute vs accuracy across test-time depth: {name}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_router_histogram(report: EvalReport, path: Path) -> Path:
    """Fraction of tokens ending at each depth, per evaluation point."""
    fig, ax = plt.subplots(figsize=(6, 4))
    width = 0.8 / max(1, len(report.points))
    for i, p in enumerate(report.points):
        total = max(1, sum(p.tokens_per_depth))
        xs = [d + i * width for d in range(len(p.tokens_per_depth))]
        ax.bar(xs, [c / total for c in p.tokens_per_depth], width=width, label=f"d={p.label}")
    ax.set_xlabel("recursion depth reached")
    ax.set_ylabel("fraction of tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


@torch.no_grad()
def depth_map(model: MoRModel, tokenizer: Any, text: str, out_dir: Path) -> list[Path]:
    """Per-token depth chosen by the router over a sample text: HTML (colored) and PNG."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids[: model.cfg.max_seq_len]
    out = model.eval()(torch.tensor([ids], device=next(model.parameters()).device))
    depths = out.depth[0].tolist()
    n_r = model.cfg.num_recursions
    colors = ["#f7fbff", "#c6dbef", "#6baed6", "#2171b5", "#08306b", "#041a3a"]
    spans = []
    for tok, d in zip(ids, depths):
        piece = html.escape(tokenizer.decode([tok]))
        fg = "white" if d >= 3 else "black"
        spans.append(
            f'<span title="depth {d}" style="background:{colors[min(d, 5)]};'
            f'color:{fg}">{piece}</span>'
        )
    legend = " ".join(
        f'<span style="background:{colors[min(d, 5)]}">&nbsp;depth {d}&nbsp;</span>'
        for d in range(n_r + 1)
    )
    html_path = out_dir / "depth_map.html"
    html_path.write_text(
        f"<html><body><p>{legend}</p><p style='font-family:monospace;"
        f"white-space:pre-wrap'>{''.join(spans)}</p></body></html>"
    )
    fig, ax = plt.subplots(figsize=(10, 1.8))
    ax.imshow([depths], aspect="auto", cmap="Blues", vmin=0, vmax=n_r)
    ax.set_yticks([])
    ax.set_xlabel("token position (sample held-out text)")
    ax.set_title("recursion depth per token (router's choice)")
    fig.tight_layout()
    png = out_dir / "depth_map.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return [html_path, png]


def write_routing_analysis(report: EvalReport, out_dir: Path) -> list[Path]:
    """routing_by_frequency.csv, routing_drift.csv and depth_by_frequency.png (routed models)."""
    if report.routing is None:
        return []
    analysis = RoutingAnalysis(**report.routing)
    table = pd.DataFrame(analysis.by_frequency)
    files = [out_dir / "routing_by_frequency.csv"]
    table.to_csv(files[0], index=False)
    if analysis.drift is not None:
        drift = pd.DataFrame({k: v for k, v in analysis.drift.items() if k != "tokens"})
        drift.insert(0, "recursion", range(1, len(drift) + 1))
        files.append(out_dir / "routing_drift.csv")
        drift.to_csv(files[-1], index=False)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.bar(table["bucket"], table["mean_depth"], color="tab:blue")
    ax.set_ylim(0, report.num_recursions)
    ax.set_ylabel("mean router depth (recursions)")
    ax.set_xlabel("token-frequency quartile (held-out text)")
    rho = analysis.spearman_depth_loss
    ax.set_title(
        "depth by token frequency"
        + (f"; Spearman(depth, full-depth loss) = {rho:.2f}" if rho is not None else ""),
        fontsize=9,
    )
    for i, row in table.iterrows():
        ax.annotate(" ".join(repr(e) for e in row["examples"][:3]), (i, 0.05), rotation=90,
                    fontsize=7, va="bottom", ha="center", color="white")  # fmt: skip
    fig.tight_layout()
    files.append(out_dir / "depth_by_frequency.png")
    fig.savefig(files[-1], dpi=200)
    plt.close(fig)
    return files


def write_artifacts(
    report: EvalReport,
    out_dir: Path,
    model: MoRModel | None = None,
    tokenizer: Any = None,
    sample_text: str | None = None,
) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    files = write_tables(report, out_dir)
    files.append(plot_depth_curve(report, out_dir / "depth_curve.png"))
    files.append(plot_router_histogram(report, out_dir / "router_histogram.png"))
    files.extend(write_routing_analysis(report, out_dir))
    if model is not None and tokenizer is not None and sample_text:
        files.extend(depth_map(model, tokenizer, sample_text, out_dir))
    return files


def point_metrics(report: EvalReport) -> list[Any]:
    """Every depth point's values twice: a series over the points under ``eval/<key>`` (step =
    point index) and a per-point key ``eval/d<point>/<key>`` for tables (``core.keys``)."""
    from mlflow.entities import Metric

    metrics: list[Metric] = []
    for step, p in enumerate(report.points):
        values: dict[str, float | None] = {
            "flops_per_token": p.flops_per_token,
            "flops_per_token_paper": p.flops_per_token_paper,
            "mean_depth": p.mean_depth,
            "average": p.average,
            "nll": p.nll,
        }
        for task, ms in p.metrics.items():
            values.update({f"{task}/{k}": v for k, v in ms.items()})
        total = max(1, sum(p.tokens_per_depth))
        values.update({f"frac_depth_{d}": c / total for d, c in enumerate(p.tokens_per_depth)})
        for key, value in values.items():
            if value is not None:
                metrics.append(Metric(eval_key(key), float(value), 0, step))
                metrics.append(Metric(eval_point_key(p.label, key), float(value), 0, 0))
    if report.routing is not None:
        for key, value in RoutingAnalysis(**report.routing).metrics().items():
            metrics.append(Metric(eval_key(key), float(value), 0, 0))
    return metrics


def log_to_mlflow(
    report: EvalReport,
    tracking_uri: str,
    parent_run_id: str | None = None,
    experiment: str = "mor",
    artifacts_dir: Path | None = None,
    run_name: str | None = None,
) -> str:
    """A child run of the training run (or a top-level run) holding the whole depth curve,
    named for people by its model (default ``eval · <the training run's name>``)."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    client = MlflowClient(tracking_uri=tracking_uri)
    model = report.meta.get("run_name") or Path(report.model).parent.name or report.model
    if parent_run_id:
        parent = client.get_run(parent_run_id)
        exp_id = parent.info.experiment_id
        model = parent.data.tags.get("mlflow.runName") or model
    else:
        exp = client.get_experiment_by_name(experiment)
        exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    tags = {TAG_KIND: KIND_EVAL}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    rid = client.create_run(exp_id, run_name=run_name or f"eval · {model}", tags=tags).info.run_id
    params = [
        Param("tasks", ",".join(report.tasks)),
        Param("limit", str(report.limit)),
        Param(PARAM_EVAL_POINTS, ",".join(p.label for p in report.points)),
        Param("model", report.model[:500]),
    ]
    metrics = point_metrics(report)
    try:
        client.log_batch(rid, params=params)
        for i in range(0, len(metrics), 500):
            client.log_batch(rid, metrics=metrics[i : i + 500])
        log_samples(client, rid, report.system_metrics)
        if artifacts_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                write_artifacts(report, Path(tmp))
                client.log_artifacts(rid, tmp)
        else:
            client.log_artifacts(rid, str(artifacts_dir))
    except Exception:
        # A half-logged run must not stay RUNNING (or look like a finished evaluation to a
        # resumed sweep, which reuses FINISHED eval runs).
        with contextlib.suppress(Exception):
            client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    if parent_run_id:
        client.set_tag(parent_run_id, TAG_EVAL_RUN_ID, rid)
    return rid
