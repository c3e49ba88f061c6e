"""Read what trainers and evals logged to MLflow into pandas tables (no second store).

Layout in MLflow (the keys and tags are ``core.keys``'): a sweep parent run → one training run
per trial (params ``model.*``, metrics ``flops``/``tokens``/``val/loss``) → one eval run per
trained model with ``eval/d<point>/<key>`` metrics per depth point and, as the artifact
``items.json``, every accuracy task's per-item scores per point (for the confidence intervals).
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow import MlflowClient

from core.endpoints import require_store
from core.keys import (
    ARTIFACT_ITEMS,
    KIND_EVAL,
    KIND_SWEEP,
    TAG_KIND,
    TAG_KV_CACHE,
    TAG_LABEL,
    TAG_NUM_RECURSIONS,
    TAG_REPLICATE_OF,
    TAG_ROUTER,
    TAG_SEED,
    TAG_SHARING,
    TAG_STOPPED_EARLY,
    TOPK_POINT,
    eval_key,
    eval_points,
)


@dataclass
class SweepRuns:
    trials: pd.DataFrame  # one row per training run
    points: pd.DataFrame  # one row per (training run, depth point)
    parent_run_ids: list[str]  # the sweeps' parent runs (empty for a plain experiment)
    experiment_ids: list[str]
    items: dict[str, dict[str, dict[str, list[float]]]] = field(default_factory=dict)
    """Per training run id: its eval's ``items.json`` ({point: {task: per-item scores}});
    runs evaluated before items were recorded have none."""


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _all_runs(client: MlflowClient, exp_ids: list[str], filter_string: str) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(exp_ids, filter_string, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def resolve(client: MlflowClient, name: str) -> tuple[list[str], list[str]]:
    """A sweep name (its parent runs) or an experiment name → (experiment ids, parent ids)."""
    exp_ids = _experiments(client)
    sweeps = _all_runs(
        client, exp_ids, f"tags.`{TAG_KIND}` = '{KIND_SWEEP}' and tags.`mlflow.runName` = '{name}'"
    )
    if sweeps:
        return sorted({r.info.experiment_id for r in sweeps}), [r.info.run_id for r in sweeps]
    exp = client.get_experiment_by_name(name)
    if exp is None:
        raise ValueError(
            f"{name!r} is neither a sweep nor an MLflow experiment at {client.tracking_uri}"
        )
    return [exp.experiment_id], []


def load_runs(tracking_uri: str, names: list[str], items: bool = True) -> SweepRuns:
    """Trials and their per-depth evaluation points for one or more sweeps or experiments;
    ``items`` also reads each eval run's per-item scores (one small file per eval run).
    A local store that does not exist is an error, never created (a report is read-only)."""
    require_store(tracking_uri, names)
    client = MlflowClient(tracking_uri)
    exp_ids: list[str] = []
    parents: list[str] = []
    for name in names:
        e, p = resolve(client, name)
        exp_ids += [x for x in e if x not in exp_ids]
        parents += p
    train_runs = _all_runs(client, exp_ids, f"tags.`{TAG_SHARING}` != ''")
    if parents:
        train_runs = [r for r in train_runs if r.data.tags.get("mlflow.parentRunId") in parents]
    eval_runs = _all_runs(client, exp_ids, f"tags.`{TAG_KIND}` = '{KIND_EVAL}'")
    eval_by_parent = {r.data.tags.get("mlflow.parentRunId"): r for r in eval_runs}
    trial_rows, point_rows, item_scores = [], [], {}
    for run in train_runs:
        row = trial_row(run)
        trial_rows.append(row)
        ev = eval_by_parent.get(run.info.run_id)
        if ev is None or row["stopped_early_at_flops"] is not None:
            continue  # no depth points (so no Pareto point) for a partial model
        row.update(routing_columns(ev.data.metrics))
        if items and (scores := eval_items(client, ev.info.run_id)):
            item_scores[run.info.run_id] = scores
        for point, values in eval_points(ev.data.metrics).items():
            point_rows.append(
                {
                    "run_id": run.info.run_id,
                    "model": row["model"],
                    "replicate_of": row["replicate_of"],
                    "sharing": row["sharing"],
                    "router": row["router"],
                    "num_recursions": row["num_recursions"],
                    "kv_cache": row["kv_cache"],
                    "point": point,
                    "fixed_depth": point.isdigit(),
                    # The top-k point sees future tokens: shown beside the causal router's
                    # point, never on a front of what a deployed model can do.
                    "causal": point != TOPK_POINT,
                    **values,
                }
            )
    trials, points = pd.DataFrame(trial_rows), pd.DataFrame(point_rows)
    return SweepRuns(trials, points, parents, exp_ids, item_scores)


def eval_items(client: MlflowClient, eval_run_id: str) -> dict[str, dict[str, list[float]]]:
    """An eval run's ``items.json``; empty when it has none (logged before items were)."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR as BAR
    from mlflow.exceptions import MlflowException

    saved = os.environ.get(BAR.name)
    os.environ[BAR.name] = "false"  # no progress bar per eval run on the report's stderr
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(eval_run_id, ARTIFACT_ITEMS, tmp)
            return json.loads(Path(path).read_text())
    except (MlflowException, OSError):
        return {}
    finally:
        if saved is None:
            os.environ.pop(BAR.name, None)
        else:
            os.environ[BAR.name] = saved


def trial_row(run: Any) -> dict[str, Any]:
    """A training run's row: its MoR shape, sizes, training FLOPs and losses."""
    p, m, t = run.data.params, run.data.metrics, run.data.tags
    row = {
        "run_id": run.info.run_id,
        "name": t.get("mlflow.runName", run.info.run_id),
        "status": run.info.status,
        "sharing": t.get(TAG_SHARING),
        "router": t.get(TAG_ROUTER),
        "num_recursions": int(t.get(TAG_NUM_RECURSIONS, 1)),
        "kv_cache": t.get(TAG_KV_CACHE),
        "preset": p.get("model.preset"),
        "params_non_embedding": _num(p.get("model.params_non_embedding")),
        "params_total": _num(p.get("model.params_total")),
        "train_flops": m.get("flops"),
        "tokens": m.get("tokens"),
        "val_nll": m.get("val/loss"),
        "train_loss": m.get("train/loss"),
        "sweep": t.get("mlflow.parentRunId"),
        "label": t.get(TAG_LABEL),
        "seed": t.get(TAG_SEED),
        # ASHA stopped it at this rung (training FLOPs): a partial result, not a finished model
        "stopped_early_at_flops": _num(t.get(TAG_STOPPED_EARLY)),
    }
    # Runs of one configuration with different seeds share this (a plain run: itself).
    row["replicate_of"] = t.get(TAG_REPLICATE_OF) or row["label"] or row["run_id"]
    row["model"] = model_label(row)
    return row


def routing_columns(metrics: dict[str, float]) -> dict[str, float | None]:
    """What an eval logged about its router on held-out text (``evals.routing_analysis``):
    the largest |eval-mode active fraction − training capacity| over recursions, the lowest
    agreement with training's top-k, and Spearman(depth, full-depth loss)."""
    agree = [v for k, v in metrics.items() if k.startswith(eval_key("drift/agree_r"))]
    return {
        "drift_max_gap": metrics.get(eval_key("drift/max_abs_gap")),
        "drift_min_agree": min(agree) if agree else None,
        "spearman_depth_loss": metrics.get(eval_key("routing/spearman_depth_loss")),
    }


def model_label(row: dict) -> str:
    """Short human name of a configuration, e.g. 'middle_cycle N_r=2 expert_choice'."""
    if row.get("label"):
        return str(row["label"]).split(",budget=")[0]
    if row.get("sharing") in (None, "none"):
        return "vanilla"
    router = row.get("router") or "none"
    kind = "recursive" if router == "none" else router.replace("_choice", "-choice")
    kv = "" if row.get("kv_cache") in (None, "recursion_wise") else " kv-shared"
    return f"{row['sharing']} N_r={row['num_recursions']} {kind}{kv}"


def _num(v: str | None) -> float | None:
    try:
        return float(v) if v is not None else None
    except ValueError:
        return None
