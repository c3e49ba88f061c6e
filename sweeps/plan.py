"""A sweep's trials, planned and validated before Ray starts: the grid points (variants × grid
values × budgets × seeds), each point's ``TrainConfig`` (``trial_config``: Tune's param_space
becomes that config at the trial boundary), the names people see, and ``plan_sweep``: every
trial the spec can produce is built and validated here, so a typo or an impossible combination
is a clear error naming the field, never a failed trial on the cluster.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from core.keys import TAG_LABEL, TAG_REPLICATE_OF, TAG_SEED
from mor.overrides import ConfigError, apply_overrides, validate
from sweeps.space import asha_milestones, sample_defaults
from sweeps.spec import SweepSpec
from trainers.config import TrainConfig


def _variant_overrides(v: dict[str, Any]) -> dict[str, Any]:
    return {k: val for k, val in v.items() if k != "name"}


class TrialPoint(BaseModel):
    """One grid point of a sweep: what Tune's param_space carries to a trial, validated back
    into this type at the trial boundary."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    label: str
    """Human name, e.g. 'mor-ec,router=expert_choice,budget=6e+09' (the MLflow tag)."""
    overrides: dict[str, Any] = Field(default_factory=dict)
    """Dotted TrainConfig overrides: the variant's, then the grid axes' values."""
    budget: float | None = Field(None, gt=0)
    """Training FLOPs of this point (None = the base config's own budget)."""
    replicate_of: str = ""
    """The label without the seed: what this point's replicates have in common."""


def grid_points(spec: SweepSpec) -> list[TrialPoint]:
    """Every (variant, grid value..., budget, seed) combination; with ``seeds`` the label ends
    in the seed and the seed overrides the base config's."""
    variants = spec.variants or [{"name": ""}]
    grid_axes = [(k, d.grid) for k, d in spec.space.items() if d.kind == "grid"]
    budgets = spec.budgets or [None]
    seeds: list[int | None] = list(spec.seeds) if spec.seeds else [None]
    points = []
    for variant in variants:
        for values in itertools.product(*(vals for _, vals in grid_axes)):
            for budget in budgets:
                ov = dict(_variant_overrides(variant))
                ov.update({k: v for (k, _), v in zip(grid_axes, values)})
                parts = [variant["name"]] if variant["name"] else []
                parts += [f"{k.split('.')[-1]}={v}" for (k, _), v in zip(grid_axes, values)]
                if budget is not None:
                    parts.append(f"budget={budget:.3g}")
                for seed in seeds:
                    named = [] if seed is None else [f"seed={seed}"]
                    points.append(
                        TrialPoint(
                            label=",".join(parts + named) or "base",
                            overrides=ov if seed is None else {**ov, "seed": seed},
                            budget=budget,
                            replicate_of=",".join(parts) or "base",
                        )
                    )
    return points


def trial_config(
    spec: SweepSpec,
    point: TrialPoint,
    sampled: dict[str, Any] | None = None,
    *,
    name: str,
    parent_run_id: str | None = None,
    tracking_uri: str | None = None,
) -> TrainConfig:
    """The TrainConfig of one trial, built once and validated like a `mor train` config.

    Base, then the point's dotted overrides and the searcher's sampled values, then what the
    sweep owns: the budget, the name, tracking (a child of the sweep's parent run, tagged with
    the point), scaling from ``spec.resources`` and the sweep's storage path.
    """
    items = [f"{k}={_yaml(v)}" for k, v in {**point.overrides, **(sampled or {})}.items()]
    data = apply_overrides(spec.base, items)
    if point.budget is not None:  # iso-FLOP: the point's budget replaces the base's kind
        convention = {k: v for k, v in data.get("budget", {}).items() if k == "convention"}
        data["budget"] = {**convention, "flops": point.budget}
    res = spec.resources
    data["scaling"] = {
        **data.get("scaling", {}),
        "num_workers": res.num_workers,
        "cpus_per_worker": res.cpus_per_worker,
        "use_gpu": res.gpus_per_worker > 0,
        "placement_strategy": res.placement_strategy,
    }
    data["tracking"] = {
        "uri": tracking_uri,
        "experiment": spec.tracking.experiment,
        "parent_run_id": parent_run_id,
        "tags": {
            "mlflow.runName": trial_title(with_sampled(point.label, sampled)),
            TAG_LABEL: with_sampled(point.label, sampled),
            TAG_REPLICATE_OF: with_sampled(point.replicate_of or point.label, sampled),
            TAG_SEED: str(data.get("seed", 0)),
        },
    }
    if spec.scheduler is not None:  # validate at ASHA's rungs: same FLOPs for every model
        data["eval"] = {**data.get("eval", {}), "at_flops": asha_milestones(spec)}
    data["name"] = name
    data["storage_path"] = spec.resolved_storage_path
    return validate(TrainConfig, data)


def with_sampled(label: str, sampled: dict[str, Any] | None) -> str:
    """A trial's label with the searcher's draws before its budget and seed, e.g.
    'sharing=cycle,num_recursions=2,lr=0.0034,budget=2e+11': what names the model in reports."""
    if not sampled:
        return label
    drawn = [f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else
             f"{k.split('.')[-1]}={v}" for k, v in sampled.items()]  # fmt: skip
    parts = [x for x in label.split(",") if x and x != "base"]
    at = next((i for i, x in enumerate(parts) if x.startswith(("budget=", "seed="))), len(parts))
    return ",".join(parts[:at] + drawn + parts[at:])


def trial_title(label: str) -> str:
    """A trial's MLflow run name, for people: 'mor-ec-middle-cycle-3 @ 2e12' for the label
    'mor-ec-middle-cycle-3,budget=2e+12'; grid values and draws stay, a seed goes last
    ('cycle, lr=0.0034 @ 2e11 · seed 1'). Code finds runs by their tags, not by this."""
    parts = [p for p in label.split(",") if p]
    budget = next((p[len("budget=") :] for p in parts if p.startswith("budget=")), None)
    seed = next((p[len("seed=") :] for p in parts if p.startswith("seed=")), None)
    title = ", ".join(p for p in parts if not p.startswith(("budget=", "seed="))) or "base"
    if budget is not None:
        title += " @ " + f"{float(budget):.3g}".replace("e+0", "e").replace("e+", "e")
    if seed is not None:
        title += f" · seed {seed}"
    return title


def _yaml(v: Any) -> str:
    return json.dumps(v) if not isinstance(v, str) else v


@dataclass(frozen=True)
class SweepPlan:
    """A sweep spec after its one full validation (``plan_sweep``): what the driver runs and
    what a job submission sends. Its storage path is absolute."""

    spec: SweepSpec
    points: tuple[TrialPoint, ...]
    """The grid points to run."""
    dropped: tuple[str, ...] = ()
    """Why each invalid point was dropped (``skip_invalid``)."""


def _choice_combos(spec: SweepSpec, skip: str | None = None) -> list[dict[str, Any]]:
    """Combinations of the choice axes' values (all but ``skip``; the first 256)."""
    axes = [[(k, v) for v in d.choice] for k, d in spec.space.items()
            if d.kind == "choice" and k != skip]  # fmt: skip
    return [dict(c) for c in itertools.islice(itertools.product(*axes), 256)]


def _first_valid(
    spec: SweepSpec, points: list[TrialPoint], combos: list[dict[str, Any]], key: str | None
) -> list[str]:
    """[] when some point with some combination (``key`` among the axes drawn) builds a valid
    TrainConfig, else the errors met."""
    errors = []
    for point, combo in itertools.product(points, combos):
        sampled = sample_defaults(spec, point, combo)
        if key is not None and key not in sampled:  # the axis does not apply here
            continue
        try:
            trial_config(spec, point, sampled, name="check")
            return []
        except ConfigError as exc:
            errors.append(str(exc).replace("invalid config:", "").strip())
    return errors or ["its 'when' holds for no point"]


def _check_point(spec: SweepSpec, point: TrialPoint) -> None:
    """A point is kept when some values of the sampled axes make its TrainConfig valid.

    Other combinations are checked when the searcher draws them (an invalid draw is skipped,
    with its reason, before any trial starts: sweeps/search.py); ``_check_choices`` catches a
    value that no point accepts (a typo) up front."""
    errors = _first_valid(spec, [point], _choice_combos(spec), None)
    if errors:
        raise ConfigError(errors[0])


def _check_choices(spec: SweepSpec, points: list[TrialPoint]) -> None:
    """Every value of a choice axis must work with at least one point and some values of the
    other choice axes; else it is a typo or an impossible value: an error naming the axis,
    not a skip on every draw."""
    for key, d in spec.space.items():
        if d.kind != "choice":
            continue
        combos = _choice_combos(spec, skip=key)
        for value in d.choice[1:]:
            errors = _first_valid(spec, points, [{**c, key: value} for c in combos], key)
            if errors:
                raise ConfigError(f"space.{key}: {value!r} fits no trial: {errors[0]}")


def point_flops(spec: SweepSpec, point: TrialPoint) -> float:
    """The training-FLOPs budget of a point (for ``max_total_flops``)."""
    if point.budget is not None:
        return point.budget
    flops = (spec.base.get("budget") or {}).get("flops")
    if flops is None:
        raise ConfigError("max_total_flops: needs FLOPs budgets (budgets, or base budget.flops)")
    return float(flops)


def _capped(spec: SweepSpec, points: list[TrialPoint]) -> tuple[list[TrialPoint], list[str]]:
    """Grid: the points, in order, while their budgets fit ``max_total_flops``."""
    if spec.max_total_flops is None:
        return points, []
    kept, spent, dropped = [], 0.0, []
    for p in points:
        need = point_flops(spec, p)
        if spent + need > spec.max_total_flops:
            dropped.append(
                f"trial {p.label!r}: max_total_flops {spec.max_total_flops:.3g} reached "
                f"({spent:.3g} planned, this trial needs {need:.3g})"
            )
            continue
        kept.append(p)
        spent += need
    return kept, dropped


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Validate every trial the spec can produce, once per process, before Ray starts.

    Relative storage paths resolve here, against the caller's working directory (Tune runs
    each trial in its own). Raises ConfigError when a point is invalid and ``skip_invalid``
    is false, or when no point remains.
    """
    spec = spec.model_copy(update={"storage_path": spec.resolved_storage_path})
    ok, dropped = [], []
    for point in grid_points(spec):
        try:
            _check_point(spec, point)
        except ConfigError as exc:
            msg = f"trial {point.label!r}: {str(exc).replace('invalid config:', '').strip()}"
            if point.budget is not None:  # the sweep's `budgets` set this trial's budget.flops
                msg = msg.replace("budget.flops:", "budgets → budget.flops:")
            if not spec.skip_invalid:
                raise ConfigError(
                    f"{msg}\n  (set skip_invalid: true to drop such trials)"
                ) from None
            dropped.append(msg)
            continue
        ok.append(point)
    if not ok:
        raise ConfigError("space: no valid trial configuration remains")
    _check_choices(spec, ok)
    for p in ok:  # a cap without FLOPs budgets is an error, for every searcher
        if spec.max_total_flops is not None:
            point_flops(spec, p)
    if spec.searcher == "grid":  # the searchers apply the cap as they propose (search.py)
        ok, capped = _capped(spec, ok)
        dropped += capped
        if not ok:
            raise ConfigError("max_total_flops: smaller than the budget of the first trial")
    return SweepPlan(spec, tuple(ok), tuple(dropped))
