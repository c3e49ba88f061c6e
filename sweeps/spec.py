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

import itertools
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mor.overrides import ConfigError, apply_overrides, load_yaml, validate
from trainers.config import TrainConfig

_STRICT = ConfigDict(extra="forbid", use_attribute_docstrings=True, protected_namespaces=())
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,79}$")


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
    """MLflow experiment for the sweep's parent run and its trials."""


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
    searcher: Literal["grid", "random", "optuna"] = "grid"
    """grid: every grid point once; random: num_samples draws of the sampled axes per grid
    point; optuna: TPE over all axes (grid axes become categorical)."""
    num_samples: int = Field(1, ge=1)
    """Samples per grid point (random) or in total (optuna)."""
    metric: str = "eval/average"
    """What the searcher optimises."""
    mode: Literal["min", "max"] = "max"
    """Whether the metric is better high or low."""
    scheduler: SchedulerSpec | None = None
    """Optional early stopping (ASHA on cumulative FLOPs)."""
    resources: Resources = Field(default_factory=Resources)
    """Per-trial resources and concurrency."""
    eval: EvalSpec = Field(default_factory=EvalSpec)
    """Evaluation of every trained trial."""
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    """MLflow location."""
    storage_path: str = "outputs"
    """Folder for Tune/Train state, checkpoints, exports and the local MLflow store."""
    skip_invalid: bool = False
    """Drop grid points whose config is invalid (listed in the log) instead of failing."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("use letters, digits, '.', '_' or '-' (at most 80, no spaces)")
        return v

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list[float]) -> list[float]:
        if any(b <= 0 for b in v):
            raise ValueError(f"every budget must be > 0 (got {v})")
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
        return self

    @property
    def resolved_storage_path(self) -> str:
        return str(Path(self.storage_path).expanduser().resolve())


def _variant_overrides(v: dict[str, Any]) -> dict[str, Any]:
    return {k: val for k, val in v.items() if k != "name"}


def grid_points(spec: SweepSpec) -> list[dict[str, Any]]:
    """Every (variant, grid value..., budget) combination as {'label', 'overrides'}."""
    variants = spec.variants or [{"name": ""}]
    grid_axes = [(k, d.grid) for k, d in spec.space.items() if d.kind == "grid"]
    budgets = spec.budgets or [None]
    points = []
    for variant in variants:
        for values in itertools.product(*(vals for _, vals in grid_axes)):
            for budget in budgets:
                ov = dict(_variant_overrides(variant))
                ov.update({k: v for (k, _), v in zip(grid_axes, values)})
                if budget is not None:
                    ov["budget"] = {"flops": budget}
                parts = [variant["name"]] if variant["name"] else []
                parts += [f"{k.split('.')[-1]}={v}" for (k, _), v in zip(grid_axes, values)]
                if budget is not None:
                    parts.append(f"budget={budget:.3g}")
                points.append({"label": ",".join(parts) or "base", "overrides": ov})
    return points


def trial_config(spec: SweepSpec, overrides: dict[str, Any], name: str) -> TrainConfig:
    """The TrainConfig of one trial: base, then the point's dotted overrides."""
    data = apply_overrides(spec.base, [])
    budget = overrides.get("budget")
    items = [f"{k}={_yaml(v)}" for k, v in overrides.items() if k != "budget"]
    data = apply_overrides(data, items)
    if budget is not None:
        data["budget"] = {
            **{k: v for k, v in data.get("budget", {}).items() if k == "convention"},
            **budget,
        }
    data["name"] = name
    data.setdefault("storage_path", spec.storage_path)
    return validate(TrainConfig, data)


def _yaml(v: Any) -> str:
    import json

    return json.dumps(v) if not isinstance(v, str) else v


def sample_defaults(spec: SweepSpec) -> dict[str, Any]:
    """A representative value per sampled axis (its first choice or low bound), for checks."""
    out: dict[str, Any] = {}
    for k, d in spec.space.items():
        if d.kind == "choice":
            out[k] = d.choice[0]
        elif d.kind in ("uniform", "loguniform", "randint"):
            out[k] = getattr(d, d.kind)[0]
    return out


def validate_spec(spec: SweepSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """Validate every grid point (and every value of each sampled choice axis).

    Returns (valid points, messages about dropped points). Raises ConfigError when a point is
    invalid and ``skip_invalid`` is false.
    """
    ok, dropped = [], []
    choice_axes = [(k, d.choice) for k, d in spec.space.items() if d.kind == "choice"]
    for point in grid_points(spec):
        checks = [dict(point["overrides"], **sample_defaults(spec))]
        for key, values in choice_axes:  # every choice value must work with this point
            checks += [dict(checks[0], **{key: v}) for v in values[1:]]
        try:
            for ov in checks:
                trial_config(spec, ov, "check")
        except ConfigError as exc:
            msg = f"trial {point['label']!r}: {str(exc).replace('invalid config:', '').strip()}"
            if not spec.skip_invalid:
                raise ConfigError(
                    f"{msg}\n  (set skip_invalid: true to drop such trials)"
                ) from None
            dropped.append(msg)
            continue
        ok.append(point)
    if not ok:
        raise ConfigError("space: no valid trial configuration remains")
    return ok, dropped


def load_spec(path: str | Path, overrides: list[str] | None = None) -> SweepSpec:
    data = apply_overrides(load_yaml(path), overrides or [])
    spec = validate(SweepSpec, data)
    validate_spec(spec)
    return spec
