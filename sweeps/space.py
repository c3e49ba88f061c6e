"""What a sweep's searchers may draw, and where ASHA compares trials.

Pure functions of the spec (no Ray, no TrainConfig): the order the sampled axes are drawn in
(an axis after those its ``when`` names), whether a conditional axis applies to a trial, a
representative draw for the up-front checks, and ASHA's rungs in training FLOPs.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sweeps.plan import TrialPoint
    from sweeps.spec import SweepSpec


def _lookup(spec: SweepSpec, point: TrialPoint, sampled: dict[str, Any], key: str) -> Any:
    """A dotted key's value for a trial: sampled, else the point's, else the base config's."""
    for source in (sampled, point.overrides):
        if key in source:
            return source[key]
    node: Any = spec.base
    for part in key.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def draw_order(spec: SweepSpec) -> list[str]:
    """The sampled axes in the order they are drawn: an axis after those its ``when`` names
    (the spec's order otherwise; YAML writers may sort keys)."""
    pending = [k for k, d in spec.space.items() if d.kind != "grid"]
    order: list[str] = []
    while pending:
        ready = [k for k in pending
                 if all(w not in pending or w == k for w in spec.space[k].when or {})]  # fmt: skip
        if not ready:
            raise ValueError(f"space: the 'when' conditions of {pending} form a cycle")
        order += ready
        pending = [k for k in pending if k not in ready]
    return order


def is_active(spec: SweepSpec, key: str, point: TrialPoint, sampled: dict[str, Any]) -> bool:
    """Whether the sampled axis ``key`` applies to this trial (its ``when`` holds)."""
    when = spec.space[key].when or {}
    return all(_lookup(spec, point, sampled, k) in vals for k, vals in when.items())


def sample_defaults(
    spec: SweepSpec, point: TrialPoint | None = None, fixed: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A representative value per sampled axis (its first choice or low bound, or the value
    ``fixed`` gives it), for checks; with a point, only the axes active for it (in spec
    order, as the searchers draw them)."""
    out: dict[str, Any] = {}
    fixed = fixed or {}
    for k in draw_order(spec):
        if point is not None and not is_active(spec, k, point, out):
            continue
        d = spec.space[k]
        out[k] = fixed.get(k, d.choice[0] if d.kind == "choice" else getattr(d, d.kind)[0])
    return out


def asha_milestones(spec: SweepSpec) -> list[float]:
    """The FLOPs at ASHA's rungs: grace × rf^k below the largest budget (Tune's rungs)."""
    s = spec.scheduler
    if s is None or not spec.budgets:
        return []
    n = int(math.log(max(spec.budgets) / s.grace_flops) / math.log(s.reduction_factor) + 1)
    rungs = [s.grace_flops * s.reduction_factor**k for k in range(max(0, n))]
    return [m for m in rungs if m < max(spec.budgets)]  # the budget itself is no rung
