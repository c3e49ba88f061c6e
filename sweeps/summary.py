"""A sweep's parent run in MLflow: summary metrics beside its report artifacts.

Per training budget: the best value of the headline metric among the finished trials, how
many models are on that budget's Pareto front (the report's), and the trials finished and
failed; over the whole sweep: trials finished and failed, and the models on the report's
front. The best trial itself (``best/<metric>``, its tags) and the FLOPs spent are logged by
``sweeps.driver.search_outcome``. The key formats are ``core.keys``'.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from core.keys import (
    SWEEP_FAILED,
    SWEEP_FINISHED,
    SWEEP_FRONT_MODELS,
    budget_key,
    eval_key,
    higher_is_better,
)


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
