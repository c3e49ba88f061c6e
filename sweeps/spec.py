"""The sweep spec: a base training config, a search space, FLOPs budgets, searcher, resources.

Validated completely before Ray starts: every trial configuration the grid can produce is
built and validated as a ``TrainConfig`` here, so a typo or an impossible combination is a
clear error naming the field, never a failed trial on the cluster.

    name: my-sweep
    base: {model: {preset: tiny}, data: {seq_len: 128}}      # a TrainConfig, as for `mor train`
    variants:                                               # optional named starting points
      - {name: vanilla, model.sharing: none, model.num_recursions: 1}
    space:                                                  # dotted TrainConfig keys
      model.router: {grid: [expert_choice, token_choice]}
      optim.lr: {loguniform: [1e-3, 1e-2]}
    budgets: [2.0e12]                                       # training FLOPs; iso-FLOP per budget
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from core.keys import eval_key, higher_is_better
from core.names import check_name
from core.storage import resolve_storage
from mor.overrides import apply_overrides, load_yaml, validate
from sweeps.space import draw_order
from trainers.config import PlacementStrategy

POINT = "point"
"""The trial config entry holding the trial's TrialPoint (as a plain dict)."""
_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())


class Dimension(BaseModel):
    """One search-space axis: exactly one of the forms below."""

    model_config = _STRICT
    grid: list[Any] | None = None
    """Every value is tried (a Cartesian product with the other grid axes)."""
    choice: list[Any] | None = None
    """One value sampled per trial."""
    uniform: tuple[float, float] | None = None
    """A float sampled uniformly in [low, high]."""
    loguniform: tuple[float, float] | None = None
    """A float sampled log-uniformly in [low, high] (both > 0)."""
    randint: tuple[int, int] | None = None
    """An integer sampled in [low, high)."""
    when: dict[str, list[Any]] | None = None
    """Conditional axis (random/optuna): sampled only when every named dotted key has one of
    the listed values (from the trial's point, an earlier axis or the base config), e.g.
    ``{model.sharing: [cycle, middle_cycle]}`` for ``model.router``; otherwise the base
    config's value stands and the searcher draws nothing for it."""

    @model_validator(mode="after")
    def _one(self) -> Dimension:
        given = [
            k
            for k in ("grid", "choice", "uniform", "loguniform", "randint")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of grid, choice, uniform, loguniform, randint "
                f"(got {given or 'none'})"
            )
        kind = given[0]
        if kind in ("grid", "choice") and not getattr(self, kind):
            raise ValueError(f"{kind}: needs at least one value")
        if kind in ("uniform", "loguniform", "randint"):
            lo, hi = getattr(self, kind)
            if not lo < hi:
                raise ValueError(f"{kind}: low must be < high (got [{lo}, {hi}])")
            if kind == "loguniform" and lo <= 0:
                raise ValueError("loguniform: bounds must be > 0")
        return self

    @field_validator("when")
    @classmethod
    def _when(cls, v: dict[str, list[Any]] | None) -> dict[str, list[Any]] | None:
        if v is not None and (not v or not all(isinstance(x, list) and x for x in v.values())):
            raise ValueError("when: give each dotted key a non-empty list of values")
        return v

    @property
    def kind(self) -> str:
        return next(
            k
            for k in ("grid", "choice", "uniform", "loguniform", "randint")
            if getattr(self, k) is not None
        )


class Resources(BaseModel):
    model_config = _STRICT
    num_workers: int = Field(1, ge=1)
    """Ray Train workers per trial."""
    cpus_per_worker: float = Field(1.0, gt=0)
    """CPUs per training worker."""
    gpus_per_worker: float = Field(0.0, ge=0)
    """GPUs per training worker (0 = CPU training)."""
    max_concurrent: int | None = Field(None, ge=1)
    """Trials at once; default: as many as the cluster's CPUs (or GPUs) fit."""
    placement_strategy: PlacementStrategy = "PACK"
    """Where Ray places a trial's workers: PACK, SPREAD or STRICT_SPREAD (each worker of a
    trial on its own node), as ``scaling.placement_strategy`` of a training run."""

    @field_validator("placement_strategy", mode="before")
    @classmethod
    def _upper(cls, v: Any) -> Any:
        return v.upper() if isinstance(v, str) else v


class SchedulerSpec(BaseModel):
    model_config = _STRICT
    type: Literal["asha"] = "asha"
    """Early stopping: ASHA on cumulative training FLOPs."""
    metric: str = "val/loss"
    """Reported metric to compare trials on."""
    mode: Literal["min", "max"] = "min"
    """Whether lower or higher is better."""
    grace_flops: float = Field(..., gt=0)
    """Training FLOPs every trial gets before it can be stopped."""
    reduction_factor: float = Field(2.0, gt=1)
    """ASHA's halving rate."""


class EvalSpec(BaseModel):
    model_config = _STRICT
    tasks: list[str] = Field(default_factory=lambda: ["mor_heldout_bpb", "mor_heldout_mc"])
    """lm-eval tasks run on every trained trial at every depth."""
    depths: list[str] | None = None
    """Points to evaluate ('1', '2', ..., 'router'); default every depth plus the router's."""
    topk: bool = False
    """Also evaluate expert-choice models with training's top-k over each sequence (point
    'topk'): the paper's non-causal evaluation, beside the causal router's point so the report
    shows each model's causality gap. Other models skip it."""
    data_dir: str | None = None
    """Folder with the paper's eval sets in their release formats (offline)."""
    limit: int | None = Field(None, ge=1)
    """Items per task (None = all)."""
    batch_size: int = Field(32, ge=1)
    """Evaluation batch size."""
    enabled: bool = True
    """Set false to train only."""


class TrackingSpec(BaseModel):
    model_config = _STRICT
    uri: str | None = None
    """MLflow URI; default env MLFLOW_TRACKING_URI, else sqlite under storage_path."""
    experiment: str = "mor-sweeps"
    """MLflow experiment for the sweep's parent run and its trials (also its artifact folder):
    letters, digits, '.', '_', '-'."""

    @field_validator("experiment")
    @classmethod
    def _experiment(cls, v: str) -> str:
        return check_name(v)


class SweepSpec(BaseModel):
    """A whole sweep."""

    model_config = _STRICT
    name: str
    """Sweep name: the Tune experiment folder and the MLflow parent run; `mor sweep resume NAME`."""
    base: dict[str, Any] = Field(default_factory=dict)
    """The TrainConfig every trial starts from (same keys as a `mor train` YAML)."""
    variants: list[dict[str, Any]] = Field(default_factory=list)
    """Named starting points, each a dict of dotted overrides plus 'name'; crossed with the
    grid axes. Empty = one unnamed variant."""
    space: dict[str, Dimension] = Field(default_factory=dict)
    """Search space over dotted TrainConfig keys (model.sharing, model.num_recursions,
    model.router, model.router_network, model.gate, model.kv_cache, model.capacities,
    optim.lr, model.preset, ...)."""
    budgets: list[float] = Field(default_factory=list)
    """Training-FLOPs budgets; every trial of a budget gets the same compute (iso-FLOP).
    Empty = the base config's own budget."""
    seeds: list[int] | None = None
    """Replicates, e.g. [0, 1, 2]: every (variant, grid point, budget) trains once per seed,
    which sets the initialisation and the data order (``seed`` of the training config) and
    ends the trial's label (``,seed=1``). MLflow tags one configuration's runs with the same
    ``mor.replicate_of``; the report gives each configuration's mean and 95% confidence
    interval across seeds. Default: one run with the base config's seed."""
    searcher: Literal["grid", "random", "optuna"] = "grid"
    """grid: every grid point once; random: grid points × num_samples trials, each a random
    point and random values of the sampled axes; optuna: num_samples trials chosen by TPE
    over all axes (grid axes become categorical). Both draw conditional axes only where their
    ``when`` holds, and skip (and record) a draw whose trial config is invalid."""
    num_samples: int = Field(1, ge=1)
    """Samples per grid point (random) or in total (optuna)."""
    headline: str = "average"
    """The metric the sweep's report ranks models by (its Pareto front; `mor report` of the
    sweep uses it unless --metric says otherwise): 'average' (accuracy over the accuracy
    tasks), 'nll' (held-out NLL) or TASK/METRIC, e.g. 'mor_heldout_bpb/bits_per_byte'. NLL,
    bits per byte and perplexity count lower as better. Accuracy stays a second panel."""
    metric: str = eval_key("average")
    """What the searcher optimises and the sweep's best trial is chosen by; default: the
    headline (``eval/<headline>``), with ``mode`` from it (NLL, bits per byte: min)."""
    mode: Literal["min", "max"] = "max"
    """Whether the metric is better high or low (default: from the headline, when ``metric``
    is not given)."""
    scheduler: SchedulerSpec | None = None
    """Optional early stopping (ASHA on cumulative FLOPs)."""
    resources: Resources = Field(default_factory=Resources)
    """Per-trial resources and concurrency."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation of every trained trial."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow location."""
    storage_path: str = "outputs"
    """Folder or object-store URI (``s3://bucket/prefix``) for Tune/Train state, checkpoints,
    exports, prepared data (on a URI) and the sweep's summary and report; a folder also holds
    the default local MLflow store (a URI needs a tracking server: ``tracking.uri``)."""
    skip_invalid: bool = False
    """Drop grid points whose config is invalid (listed in the log) instead of failing."""
    max_total_flops: float | None = Field(None, gt=0, allow_inf_nan=False)
    """Training FLOPs the whole sweep may spend: no trial is proposed whose budget would take
    the sum over started trials (finished or stopped ones at what they used) past it."""
    max_trials: int = Field(1000, ge=1)
    """Most trials the sweep may run (see ``trial_count``); a larger sweep is refused before
    any trial is built, so a typo in a grid cannot queue 100,000 trials. Raise it on purpose."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, max_len=80)  # room for the trial suffixes of its run names

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if not all(0 < b < math.inf for b in v):  # NaN fails every comparison
            raise ValueError(f"every budget must be a finite number > 0 (got {v})")
        return v

    @field_validator("headline")
    @classmethod
    def _headline(cls, v: str) -> str:
        if v not in ("average", "nll") and not re.fullmatch(r"[\w.-]+/[\w.-]+", v):
            raise ValueError(f"use 'average', 'nll' or TASK/METRIC (got {v!r})")
        return v

    @model_validator(mode="after")
    def _metric_from_headline(self) -> SweepSpec:
        """One ranking per sweep: the best trial is the headline's best unless the spec
        names another metric (a searcher may optimise ``val/loss`` while reports rank by
        bits per byte)."""
        if "metric" not in self.model_fields_set:
            self.metric = eval_key(self.headline)
            if "mode" not in self.model_fields_set:
                self.mode = "max" if higher_is_better(self.headline) else "min"
        return self

    @field_validator("seeds")
    @classmethod
    def _seeds(cls, v: list[int] | None) -> list[int] | None:
        if v is not None and (not v or len(set(v)) != len(v) or any(s < 0 for s in v)):
            raise ValueError(f"give one or more distinct seeds ≥ 0 (got {v})")
        return v

    @field_validator("variants")
    @classmethod
    def _variants(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        names = [x.get("name") for x in v]
        if any(not isinstance(n, str) or not n for n in names):
            raise ValueError("every variant needs a non-empty 'name'")
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique (got {names})")
        return v

    @model_validator(mode="after")
    def _searcher(self) -> SweepSpec:
        sampled = [k for k, d in self.space.items() if d.kind != "grid"]
        if self.searcher == "grid" and sampled:
            raise ValueError(
                f"searcher: 'grid' cannot sample {sampled}; use 'random' or "
                "'optuna', or make them grid axes"
            )
        conditional = [k for k, d in self.space.items() if d.when and d.kind == "grid"]
        if conditional:
            raise ValueError(f"space: 'when' applies to sampled axes only (not {conditional})")
        draw_order(self)  # no cycles among the conditions
        if self.scheduler is not None and not self.budgets:
            raise ValueError("scheduler: ASHA's rungs are training FLOPs; give the sweep budgets")
        if self.scheduler is not None and self.scheduler.grace_flops >= max(self.budgets):
            raise ValueError("scheduler.grace_flops: must be below the largest budget")
        return self

    @model_validator(mode="after")
    def _bounded(self) -> SweepSpec:
        n = trial_count(self)
        if n > self.max_trials:
            raise ValueError(
                f"max_trials: this spec makes {n} trials, more than max_trials={self.max_trials}"
                "; shrink the grid, budgets or num_samples, or raise max_trials on purpose"
            )
        return self

    @property
    def resolved_storage_path(self) -> str:
        """Absolute local path (against this process's working directory), or the URI."""
        return resolve_storage(self.storage_path)


def trial_count(spec: SweepSpec) -> int:
    """Trials the sweep runs, counted from the sizes alone (nothing is built): grid points
    (variants × grid values × budgets × seeds), times num_samples for 'random'; 'optuna' runs
    num_samples trials but still checks every grid point, so the larger of the two."""
    points = max(1, len(spec.variants)) * max(1, len(spec.budgets)) * len(spec.seeds or [0])
    for d in spec.space.values():
        if d.kind == "grid":
            points *= len(d.grid)
    if spec.searcher == "random":
        return points * spec.num_samples
    return max(points, spec.num_samples) if spec.searcher == "optuna" else points


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    """A spec file plus dotted overrides, checked field by field (``plan_sweep`` checks the
    trials it produces)."""
    return validate(SweepSpec, apply_overrides(load_yaml(path), overrides or []))
