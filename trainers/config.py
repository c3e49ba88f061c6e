"""Typed config of one training run: model, data, optimizer, budget, DeepSpeed, Ray, tracking.

A YAML file, then dotted overrides (``mor train run.yaml optim.lr=1e-3``), validated before any
Ray or DeepSpeed resource is touched. Defaults follow the MoR paper (§4, Appendix): AdamW lr 3e-3,
betas (0.9, 0.95), weight decay 0.1, clipping 1.0, warmup-stable-decay with the last 20% of
steps decaying.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.names import check_name
from core.storage import is_uri, resolve_storage
from mor.config import MoRConfig, build_config
from mor.flops import training_flops_per_token
from mor.overrides import ConfigError, apply_overrides, load_yaml, validate
from trainers.data import DataConfig

_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())


class OptimConfig(BaseModel):
    model_config = _STRICT
    lr: float = Field(3e-3, gt=0.0, le=1.0)
    """Peak learning rate of AdamW."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (β1, β2), each in [0, 1)."""
    weight_decay: float = Field(0.1, ge=0.0)
    """Decoupled weight decay, applied to matrices only (not to norms or router biases)."""
    eps: float = Field(1e-8, gt=0.0)
    """AdamW epsilon."""
    grad_clip: float = Field(1.0, ge=0.0)
    """Global gradient-norm clipping threshold; 0 disables clipping."""
    schedule: Literal["wsd", "cosine", "constant"] = "wsd"
    """Learning-rate schedule: warmup-stable-decay (the paper's trapezoid), cosine, constant."""
    warmup_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    """Fraction of the steps spent in linear warmup."""
    decay_fraction: float = Field(0.2, ge=0.0, le=1.0)
    """wsd: fraction of the steps (at the end) spent decaying linearly to min_lr_ratio · lr."""
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)
    """Final learning rate as a fraction of the peak (wsd and cosine)."""

    @field_validator("betas")
    @classmethod
    def _betas(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not all(0.0 <= b < 1.0 for b in v):
            raise ValueError(f"each beta must be in [0, 1), got {list(v)}")
        return v

    @model_validator(mode="after")
    def _fractions(self) -> OptimConfig:
        if self.schedule == "wsd" and self.warmup_fraction + self.decay_fraction > 1.0:
            raise ValueError("warmup_fraction + decay_fraction must be <= 1 for schedule='wsd'")
        return self


class BatchConfig(BaseModel):
    model_config = _STRICT
    micro_batch_size: int = Field(8, ge=1)
    """Sequences per worker per forward/backward."""
    grad_accum_steps: int = Field(1, ge=1)
    """Micro-batches accumulated per optimizer step."""


class BudgetConfig(BaseModel):
    model_config = _STRICT
    flops: float | None = Field(None, gt=0.0, allow_inf_nan=False)
    """Training-FLOPs budget; converted to optimizer steps at the global batch (mor/flops.py)."""
    tokens: int | None = Field(None, gt=0)
    """Token budget (alternative to flops)."""
    steps: int | None = Field(None, gt=0)
    """Optimizer-step budget (alternative to flops and tokens)."""
    convention: Literal["exact", "paper"] = "exact"
    """FLOPs accounting: 'exact' (3 × forward matmul FLOPs incl. head) or the paper's
    (forward only, d×d attention projections, no embeddings/head)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> BudgetConfig:
        given = [k for k in ("flops", "tokens", "steps") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of flops, tokens, steps (got {given or 'none'})")
        return self


class DeepSpeedConfig(BaseModel):
    model_config = _STRICT
    zero_stage: int = Field(2, ge=0, le=3)
    """ZeRO stage 0-3 (optimizer state / gradient / parameter partitioning)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """'auto' = bf16 on GPU, fp32 on CPU."""


PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_SPREAD"]
"""Ray placement-group strategies a run's (or a sweep trial's) workers can use."""


class ScalingConfigModel(BaseModel):
    model_config = _STRICT
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (data-parallel ranks)."""
    use_gpu: bool | Literal["auto"] = "auto"
    """One GPU per worker; 'auto' uses GPUs when the Ray cluster has them."""
    cpus_per_worker: float = Field(1.0, gt=0.0)
    """CPUs reserved per worker (also its torch thread count)."""
    resource_wait_s: float = Field(0.0, ge=0.0, le=86400.0)
    """How long to wait for the cluster to grow (an autoscaling cluster) when it has fewer
    CPUs/GPUs than the workers need; 0 (default): fail at once, saying what is missing."""
    placement_strategy: PlacementStrategy = "PACK"
    """Where Ray places the workers (its placement-group strategy): PACK (default: as few
    nodes as possible), SPREAD (across nodes where possible) or STRICT_SPREAD (each worker on
    its own node; the run fails at once if fewer nodes can hold a worker)."""

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class CheckpointConfigModel(BaseModel):
    model_config = _STRICT
    every_steps: int = Field(100, ge=1)
    """Save a DeepSpeed checkpoint (all ranks) and report it to Ray every K optimizer steps."""
    keep: int = Field(2, ge=1)
    """Checkpoints kept by Ray (older ones are deleted)."""
    max_failures: int = Field(0, ge=-1)
    """Worker-failure restarts from the latest checkpoint (-1 = unlimited)."""


class EvalConfig(BaseModel):
    model_config = _STRICT
    every_steps: int = Field(50, ge=1)
    """Held-out validation loss every K optimizer steps (and at the end)."""
    batches: int = Field(4, ge=1)
    """Validation micro-batches per evaluation (per worker)."""
    at_flops: list[float] = Field(default_factory=list)
    """Also validate at the first step whose cumulative training FLOPs reach each of these,
    and report that loss to Ray at once: the milestones (rungs) an ASHA sweep compares
    trials at, identical FLOPs for every architecture (set by sweeps, not by hand)."""


class TrackingConfig(BaseModel):
    model_config = _STRICT
    uri: str | None = None
    """MLflow tracking URI; default: env MLFLOW_TRACKING_URI, else the `mor up` stack's server
    while it is up, else sqlite:///<storage>/mlflow.db."""
    experiment: str = "mor"
    """MLflow experiment name (also its artifact folder): letters, digits, '.', '_', '-'."""
    parent_run_id: str | None = None
    """Log as a nested child of this run (used by sweeps)."""
    tags: dict[str, str] = Field(default_factory=dict)
    """Extra MLflow tags on the run (sweeps set 'mor.label' to the trial's point)."""

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        return check_name(v)


class FaultInjection(BaseModel):
    """Deliberate faults for the reliability tests and chaos drills (see trainers/faults.py)."""

    model_config = _STRICT
    fail_at_step: int | None = Field(None, ge=1)
    """Testing aid: raise in rank 0 before this step runs (once per run; used by the tests)."""
    nan_at_step: int | None = Field(None, ge=1)
    """Testing aid: make the loss NaN at this step (a diverging run; used by the tests)."""


DEFAULT_PRESET = "tiny-mor"
_MIN_VOCAB = 257
"""Smallest vocabulary a tokenizer can have here (256 bytes + end-of-text): the up-front budget
check prices the output head at it, a lower bound until the tokenizer is known."""


class TrainConfig(BaseModel):
    """Everything one training run needs."""

    model_config = _STRICT
    name: str = "mor-run"
    """Run name: the Ray run folder and MLflow run name; rerunning a name resumes it."""
    model: dict[str, Any] = Field(default_factory=lambda: {"preset": DEFAULT_PRESET})
    """Model: 'preset' (default 'tiny-mor') plus any MoRConfig field overrides; vocab_size
    defaults to the tokenizer's and max_seq_len to data.seq_len."""
    data: DataConfig = Field(default_factory=DataConfig)
    """Corpus, tokenizer and sequence packing."""
    optim: OptimConfig = Field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Micro-batch size and gradient accumulation."""
    budget: BudgetConfig = Field(default_factory=lambda: BudgetConfig(steps=100))
    """How long to train: a FLOPs, token or step budget."""
    deepspeed: DeepSpeedConfig = Field(default_factory=DeepSpeedConfig)
    """DeepSpeed engine settings."""
    scaling: ScalingConfigModel = Field(default_factory=ScalingConfigModel)
    """Ray Train workers and their resources."""
    checkpoint: CheckpointConfigModel = Field(default_factory=CheckpointConfigModel)
    """Checkpoint frequency, retention and restarts."""
    eval: EvalConfig = Field(default_factory=EvalConfig)
    """Periodic held-out evaluation."""
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    """MLflow tracking."""
    storage_path: str = "outputs"
    """Where the run persists everything: Ray Train state and checkpoints, the export, the
    run's record; a folder (shared by all nodes on a cluster) or an object-store URI
    (``s3://bucket/prefix``, ``gs://...``; credentials from the environment or instance role,
    ``AWS_ENDPOINT_URL`` for S3-compatible stores). With a URI, prepared data defaults to
    ``<storage_path>/data`` and no node's local disk is assumed visible to another."""
    seed: int = 0
    """Seed for initialisation and data order."""
    log_every_steps: int = Field(1, ge=1)
    """Print progress every K steps (metrics reach MLflow every step)."""
    report_every_steps: int = Field(10, ge=1)
    """Report metrics to Ray (Tune, schedulers) every K steps, plus at evals, checkpoints and the
    end. Ray Train V2 takes one report per ~2 s controller poll, so each report can block."""
    address: str | None = None
    """Ray cluster address; None = a local Ray started on demand (or $RAY_ADDRESS)."""
    compile: bool = False
    """Compile the model with ``torch.compile``, applied from outside the model (DeepSpeed's
    ``engine.compile``; checkpoints and exports keep the model's own parameter names). The
    training forward is one graph for vanilla and expert-choice models (token-choice: one per
    recursion; ``benchmarks/compile_check.py``). Off by default: on a CPU the first step
    compiles for minutes for a modest step-time gain (benchmarks/results/compile_check.md);
    it is meant to default on for GPUs once measured on one (issue #16). Validation runs
    eager (its per-token routing has data-dependent shapes)."""
    compile_backend: Literal["inductor", "aot_eager"] = "inductor"
    """With compile: 'inductor' (generated fused kernels: the speed-up) or 'aot_eager' (the
    same captured forward and backward graphs run by eager kernels: checks that a model
    compiles and trains the same, without code generation)."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer's activations in the backward instead of keeping them
    (``torch.utils.checkpoint`` around every unique layer, applied from outside the model;
    a shared layer is checkpointed at each recursion). Trades about one more forward of the
    layers (~1/3 more step FLOPs) for activation memory: per layer only its input is kept
    (smollm-135m at seq 2048: about 230 MiB per sequence instead of 2.8 GiB, estimated in
    benchmarks/paper_sizes.py). Same losses and gradients as without; checkpoints and exports
    are unchanged by it."""
    fault_injection: FaultInjection = Field(default_factory=FaultInjection)
    """Testing aids; leave empty."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v)

    @field_validator("model")
    @classmethod
    def _model(cls, v: dict[str, Any]) -> dict[str, Any]:
        v = {"preset": DEFAULT_PRESET, **v}
        mor_config_from(v)  # raises ConfigError naming model.<field>
        return v

    @field_validator("storage_path")
    @classmethod
    def _storage(cls, v: str) -> str:
        return resolve_storage(v)

    @model_validator(mode="after")
    def _data_beside_remote_storage(self) -> TrainConfig:
        """On object storage, prepared data goes to the same store (workers on any node read
        it); a local cache would be the driver's disk only."""
        if is_uri(self.storage_path) and self.data.cache_dir is None:
            self.data = self.data.model_copy(update={"cache_dir": f"{self.storage_path}/data"})
        return self

    @model_validator(mode="after")
    def _budget_pays_for_a_step(self) -> TrainConfig:
        """Refuse a budget below one optimizer step here, before data, MLflow or Ray.

        FLOPs are priced with the model's vocab_size, else the smallest possible one, so the
        minimum is a lower bound; plan_run checks again with the tokenizer's vocabulary.
        """
        b, seq = self.budget, self.data.seq_len
        tokens_per_step = (
            self.batch.micro_batch_size * self.batch.grad_accum_steps * self.scaling.num_workers
        ) * seq
        if b.tokens is not None and b.tokens < tokens_per_step:
            raise ValueError(
                f"budget.tokens: {b.tokens} pays for no optimizer step; one step is at least "
                f"{tokens_per_step} tokens (batch × accumulation × workers × seq_len)"
            )
        if b.flops is not None:
            model = {"vocab_size": _MIN_VOCAB, "max_seq_len": seq, **self.model}
            per_token = training_flops_per_token(
                mor_config_from(model), seq, convention=b.convention
            )
            minimum = per_token * tokens_per_step
            if b.flops < minimum:
                raise ValueError(
                    f"budget.flops: {b.flops:.3g} pays for no optimizer step; one step of "
                    f"{tokens_per_step} tokens costs at least {minimum:.3g} FLOPs"
                )
        return self

    def mor_config(self, vocab_size: int | None = None) -> MoRConfig:
        """The model config; vocab_size from the tokenizer unless the model section sets it."""
        data = dict(self.model)
        if vocab_size is not None:
            given = data.get("vocab_size")
            if given is not None and int(given) < vocab_size:
                raise ConfigError(
                    f"model.vocab_size: {given} is smaller than the tokenizer's vocabulary "
                    f"({vocab_size}); remove it or set it >= {vocab_size}"
                )
            data.setdefault("vocab_size", vocab_size)
        data.setdefault("max_seq_len", self.data.seq_len)
        cfg = mor_config_from(data)
        if cfg.max_seq_len < self.data.seq_len:
            raise ConfigError(
                f"data.seq_len: {self.data.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}"
            )
        return cfg

    @property
    def resolved_storage_path(self) -> str:
        """The storage path as every process sees it (validated: absolute, or a URI)."""
        return self.storage_path


def mor_config_from(section: dict[str, Any]) -> MoRConfig:
    data = dict(section)
    preset = data.pop("preset", None)
    try:
        return build_config(preset, **data)
    except ConfigError as exc:
        msg = str(exc).replace("invalid config:\n  ", "")
        msg = msg.replace("did you mean ", "did you mean model.")
        lines = [f"model.{line.strip()}" for line in msg.splitlines() if line.strip()]
        raise ConfigError("\n  ".join(lines)) from None


def load_train_config(path: str | Path | None, overrides: Iterable[str] = ()) -> TrainConfig:
    """YAML file (optional), then dotted overrides; every error names its field."""
    data = load_yaml(path) if path is not None else {}
    data = apply_overrides(data, overrides)
    return validate(TrainConfig, data)


def default_tracking_uri(cfg: TrainConfig) -> str:
    from core.endpoints import resolve_tracking_uri

    return resolve_tracking_uri(cfg.tracking.uri, cfg.resolved_storage_path)
