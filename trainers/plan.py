"""The training plan: what the driver decided, handed to every Ray Train worker.

The driver (``trainers.launcher.plan_run``) builds it; it crosses the process boundary as
``plan.model_dump(mode="json")`` and each worker validates it back with
``TrainPlan.model_validate``, so a field added, renamed or mistyped on one side fails loudly
instead of turning into a ``KeyError`` on a remote worker.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from mor.config import MoRConfig


class TrainPlan(BaseModel):
    """Everything a worker needs besides the ``TrainConfig`` (JSON-serialisable)."""

    model_config = ConfigDict(
        extra="forbid", use_attribute_docstrings=True, protected_namespaces=(), frozen=True
    )

    model: MoRConfig
    """The resolved model config (preset, overrides and the tokenizer's vocabulary applied)."""
    total_steps: int = Field(ge=1)
    """Optimizer steps of the whole run (the budget converted at the global batch)."""
    tokens_per_step: int = Field(ge=1)
    """Tokens per optimizer step over all workers (micro-batch × accumulation × world × seq)."""
    data: dict[str, float]
    """The prepared data folders (manifest and token shards; ``trainers.data``), local or in an
    object store, with their mixture weights (one folder: weight 1). Workers read their share
    of the train splits and the held-out splits memory-mapped (``trainers.windows``)."""
    tokenizer_path: str
    """The tokenizer file, copied into the export."""
    tracking_uri: str
    """MLflow tracking URI that rank 0 logs step metrics to (may hold credentials)."""
    experiment_id: str
    """MLflow experiment of the run."""
    run_id: str
    """MLflow run of this training run (a rerun of the same name resumes it)."""
    resumed_run: bool
    """Whether ``run_id`` existed before (a rerun) rather than being created by this plan."""
    state_dir: str
    """This run's own persisted folder (``RunStore.home``: a local path or an object-store URI):
    worker pid files, the metric spool, fault-injection markers."""
    use_gpu: bool = False
    """One GPU per worker; the driver settles 'auto' against the Ray cluster before dispatch."""
    meta: dict[str, Any] = Field(default_factory=dict)
    """Provenance written into the export's metadata (run name, MLflow run id, tracking URI
    without credentials, seq_len, eos_id, FLOPs convention)."""
