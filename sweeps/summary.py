"""A sweep's parent run in MLflow: summary metrics beside its report artifacts.

Per training budget: the best value of the headline metric among the finished trials, how
many models are on that budget's Pareto front (the report's), and the trials finished and
failed; over the whole sweep: trials finished and failed, and the models on the report's
front. ``search_outcome``: what the search did (the best trial, the trials ASHA stopped, the
draws skipped, the FLOPs spent), in ``summary.json`` and on the parent run. The key formats
are ``core.keys``'.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from core.keys import (
    SWEEP_FAILED,
    SWEEP_FINISHED,
    SWEEP_FRONT_MODELS,
    budget_key,
    eval_key,
    higher_is_better,
)
from sweeps.spec import SweepSpec


def finished(row: Mapping[str, Any]) -> bool:
    """A trial that trained and was evaluated to the end (not failed, not stopped early)."""
    return not row.get("error") and not row.get("stopped_early_at_flops")


def parent_metrics(
    headline: str,
    rows: list[dict[str, Any]],
    front_models: Mapping[str, int],
    all_front_models: int | None,
) -> dict[str, float]:
    """The parent run's summary metrics from the trials' rows (each with its ``budget``) and
    the report's per-budget front sizes (keyed by the budget as labels write it, '2e+09')."""
    out: dict[str, float] = {
        SWEEP_FINISHED: sum(finished(r) for r in rows),
        SWEEP_FAILED: sum(bool(r.get("error")) for r in rows),
    }
    if all_front_models is not None:
        out[SWEEP_FRONT_MODELS] = all_front_models
    key, pick = eval_key(headline), max if higher_is_better(headline) else min
    budgets = sorted({r["budget"] for r in rows if isinstance(r.get("budget"), (int, float))})
    for budget in budgets:
        label = f"{budget:.3g}"  # as grid_points writes it into the trial labels
        group = [r for r in rows if r.get("budget") == budget]
        done = [r for r in group if finished(r)]
        out[budget_key(label, "trials_finished")] = len(done)
        out[budget_key(label, "trials_failed")] = sum(bool(r.get("error")) for r in group)
        values = [float(r[key]) for r in done if _finite(r.get(key))]
        if values:
            out[budget_key(label, f"best/{headline}")] = pick(values)
        if label in front_models:
            out[budget_key(label, "pareto_models")] = front_models[label]
    return out


def log_parent_metrics(client: Any, parent_run_id: str, metrics: Mapping[str, float]) -> None:
    """One batch on the parent run (step 0: a resumed sweep's summary replaces the last)."""
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    batch = [Metric(k, float(v), ts, 0) for k, v in sorted(metrics.items())]
    for i in range(0, len(batch), 500):
        client.log_batch(parent_run_id, metrics=batch[i : i + 500])


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_trial(spec: SweepSpec, rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The finished trial with the best ``spec.metric`` (stopped and failed trials excluded)."""
    done = [
        r
        for r in rows
        if not r.get("error")
        and not r.get("stopped_early_at_flops")
        and isinstance(r.get(spec.metric), (int, float))
        and math.isfinite(r[spec.metric])
    ]
    if not done:
        return None
    pick = (max if spec.mode == "max" else min)(done, key=lambda r: r[spec.metric])
    config = {k: pick[k] for k in spec.space if k in pick}  # the sampled values
    return {
        "label": pick["label"],
        "trial_id": pick.get("trial_id"),
        "config": config,
        "metric": spec.metric,
        "value": pick[spec.metric],
        "train_run_id": pick.get("train_run_id"),
    }


def search_outcome(
    spec: SweepSpec, rows: list[dict[str, Any]], state_dir: Path, uri: str, parent_run_id: str
) -> dict[str, Any]:
    """What the search did, in ``summary.json`` and on the MLflow parent run: the best trial
    (tags ``mor.best_label``/``mor.best.KEY``, metric ``best/METRIC``), the trials ASHA stopped
    (their runs tagged ``mor.stopped_early``; rows get ``stopped_early_at_flops``), the draws
    skipped as invalid with their reasons, and the training FLOPs spent."""
    from mlflow import MlflowClient

    from core.keys import TAG_BEST_LABEL, TAG_SKIPPED
    from sweeps.search import SKIPPED_FILE, STOPPED_FILE, mark_stopped, read_jsonl

    stopped = read_jsonl(state_dir / STOPPED_FILE)
    rung = {r["trial"]: r["rung_flops"] for r in stopped}
    for row in rows:
        if row.get("trial_id") in rung:
            row["stopped_early_at_flops"] = rung[row["trial_id"]]
    mark_stopped(uri, parent_run_id, stopped)  # again: a late end of the trial may retag it
    skipped = read_jsonl(state_dir / SKIPPED_FILE)
    spent = sum(r["flops"] for r in rows if isinstance(r.get("flops"), (int, float)))
    outcome = {
        "searcher": spec.searcher,
        "trials": len(rows),
        "finished": sum(finished(r) for r in rows),
        "failed": sum(1 for r in rows if r.get("error")),
        "stopped_early": [{k: r[k] for k in ("trial", "rung_flops", "metric")} for r in stopped],
        "skipped": skipped,
        "best": best_trial(spec, rows),
        "max_concurrent": spec.resources.max_concurrent,
        "max_total_flops": spec.max_total_flops,
        "train_flops_spent": spent,
    }
    (state_dir / "summary.json").write_text(json.dumps(outcome, indent=2, default=str))
    client = MlflowClient(uri)
    client.log_artifact(parent_run_id, str(state_dir / "summary.json"))
    client.set_tag(parent_run_id, TAG_SKIPPED, str(len(skipped)))
    client.log_metric(parent_run_id, "sweep/train_flops_spent", spent)
    client.log_metric(parent_run_id, "sweep/stopped_early", len(stopped))
    if skipped:
        client.log_artifact(parent_run_id, str(state_dir / SKIPPED_FILE))
    best = outcome["best"]
    if best is not None:
        client.set_tag(parent_run_id, TAG_BEST_LABEL, best["label"])
        for k, v in best["config"].items():
            client.set_tag(parent_run_id, f"mor.best.{k}", str(v))
        client.log_metric(parent_run_id, f"best/{spec.metric}", float(best["value"]))
    return outcome
