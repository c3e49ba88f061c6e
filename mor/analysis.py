"""Does the router run at inference what it was trained for, and where does depth go?

``routing_drift`` compares, on the same batch, the causal inference routing (``Router.decide``,
what a deployed model runs) with training's sequence-wide top-k (``topk_routing``): per
recursion, the capacity the model trained at, the active fraction each rule gives, and how
often the two rules agree on a token (issue #14; the paper's §2.2.1 names this the causality
problem of expert-choice routing). ``token_depths_and_losses`` gives what the paper's central
qualitative claim (simple tokens exit early, §4.3) is checked with: each token's router depth
beside its loss at full depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from mor.model import MoRModel


@dataclass
class RoutingDrift:
    """Per recursion r (0-based lists), over the valid tokens of the analysed batch."""

    capacity: list[float]
    """The fraction of tokens recursion r was trained to run (expert-choice capacities; the
    balanced fractions (N_r − r)/N_r for token-choice)."""
    active: list[float]
    """Eval-mode (causal) active fraction."""
    topk_active: list[float]
    """Active fraction under training's top-k routing on the same batch."""
    agreement: list[float]
    """Share of tokens on which the causal rule and top-k agree (both run r, or neither)."""
    recall: list[float]
    """Share of top-k's tokens at r that the causal rule also runs."""
    tokens: int

    def to_metrics(self, prefix: str = "drift/") -> dict[str, float]:
        """Flat metric names: ``{prefix}{capacity,active,topk_active,agree,recall}_r{r+1}``
        and ``{prefix}max_abs_gap`` (the largest |active − capacity|)."""
        out: dict[str, float] = {}
        names = ("capacity", "active", "topk_active", "agree", "recall")
        series = (self.capacity, self.active, self.topk_active, self.agreement, self.recall)
        for name, values in zip(names, series, strict=True):
            for r, v in enumerate(values):
                out[f"{prefix}{name}_r{r + 1}"] = float(v)
        gaps = [abs(a - c) for a, c in zip(self.active, self.capacity, strict=True)]
        out[f"{prefix}max_abs_gap"] = max(gaps) if gaps else 0.0
        return out

    @classmethod
    def mean(cls, drifts: list[RoutingDrift]) -> RoutingDrift:
        """Several batches as one: every field token-weighted over the batches."""
        if not drifts:
            raise ValueError("drifts: mean needs at least one RoutingDrift")
        total = sum(d.tokens for d in drifts) or 1

        def avg(name: str) -> list[float]:
            cols = zip(*(getattr(d, name) for d in drifts), strict=True)
            return [
                sum(v * d.tokens for v, d in zip(col, drifts, strict=True)) / total for col in cols
            ]

        names = ("active", "topk_active", "agreement", "recall")
        return cls(list(drifts[0].capacity), *(avg(n) for n in names), tokens=total)


def _active_by_recursion(depth: torch.Tensor, n_r: int) -> torch.Tensor:
    """[n_r, N] bool: token runs recursion r ⇔ its depth > r."""
    return torch.stack([depth > r for r in range(n_r)])


def drift_from_depths(
    model: MoRModel, causal: torch.Tensor, topk: torch.Tensor, valid: torch.Tensor
) -> RoutingDrift:
    """Compare two per-token depth maps [B, T] (causal routing, top-k routing) of one batch."""
    n_r = model.cfg.num_recursions
    a = _active_by_recursion(causal[valid], n_r).float()
    b = _active_by_recursion(topk[valid], n_r).float()
    kept = b.sum(-1).clamp_min(1)
    return RoutingDrift(
        capacity=list(model.cfg.expected_active_fractions()),
        active=a.mean(-1).tolist(),
        topk_active=b.mean(-1).tolist(),
        agreement=(a == b).float().mean(-1).tolist(),
        recall=((a * b).sum(-1) / kept).tolist(),
        tokens=int(valid.sum()),
    )


def _valid(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    return attention_mask.bool()


@torch.no_grad()
def routing_drift(
    model: MoRModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> RoutingDrift:
    """Causal inference routing vs training's top-k on the same batch (model left as found)."""
    was_training = model.training
    model.eval()
    try:
        causal = model(input_ids, attention_mask).depth
        topk = model(input_ids, attention_mask, topk_routing=True).depth
    finally:
        model.train(was_training)
    return drift_from_depths(model, causal, topk, _valid(input_ids, attention_mask))


@torch.no_grad()
def token_depths_and_losses(
    model: MoRModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids, router depth, next-token loss at full depth), flat over the valid tokens
    that have a next token: depth is what the causal router gives token t, and the loss is
    how hard predicting token t+1 from t is when every token runs all N_r recursions."""
    was_training = model.training
    model.eval()
    try:
        depth = model(input_ids, attention_mask).depth
        logits = model(input_ids, attention_mask, force_depth=model.cfg.num_recursions).logits
    finally:
        model.train(was_training)
    valid = _valid(input_ids, attention_mask)
    loss = F.cross_entropy(
        logits[:, :-1].float().transpose(1, 2), input_ids[:, 1:], reduction="none"
    )
    has_next = valid[:, :-1] & valid[:, 1:]
    return input_ids[:, :-1][has_next], depth[:, :-1][has_next], loss[has_next]
