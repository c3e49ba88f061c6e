"""What one optimizer step measured: losses, routing, throughput, FLOPs and MFU.

A step's micro-batches are gathered on each rank (``MicroBatchTotals``), reduced over ranks in
one all-reduce, and turned into the step's metric dict (``StepMeter``). Router metrics come
from ``RoutingStats.to_metrics`` (mor/model.py), so their keys are defined in one place.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from mor.config import MoRConfig
from mor.flops import training_flops_per_token
from mor.model import RoutingCounts, RoutingStats
from trainers.config import TrainConfig

# Published peak dense bf16 FLOP/s per GPU (NVIDIA data sheets, without 2:4 sparsity), matched
# against torch.cuda.get_device_name. Listed most specific first: the lookup also sorts by
# name length, so "H100 PCIe" (756 TFLOP/s) never gets the SXM part's 989 TFLOP/s that a plain
# "H100" ("NVIDIA H100 80GB HBM3") has. Devices not listed get no MFU.
PEAK_FLOPS: dict[str, float] = {
    "H100 PCIe": 756e12,
    "H100 NVL": 835e12,
    "H200 NVL": 835e12,
    "GH200": 989e12,
    "H100": 989e12,
    "H200": 989e12,
    "B200": 2250e12,
    "A100": 312e12,
    "L40S": 362e12,
    "A10G": 125e12,
}
_MOST_SPECIFIC_FIRST = sorted(PEAK_FLOPS, key=len, reverse=True)


def peak_flops(device_name: str) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU named ``device_name``, or None when unknown.

    The longest listed name contained in ``device_name`` (case-insensitive) wins.
    """
    name = device_name.casefold()
    return next((PEAK_FLOPS[k] for k in _MOST_SPECIFIC_FIRST if k.casefold() in name), None)


def all_mean(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Mean of each value over the data-parallel ranks (the values themselves without any),
    read back to the host once."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


@dataclass
class ReducedStep:
    """One optimizer step averaged over its micro-batches and all ranks."""

    loss: float
    lm_loss: float
    router_loss: float
    routing: RoutingStats | None  # None for a model without recursion


@dataclass
class MicroBatchTotals:
    """The micro-batches of one optimizer step on this rank, kept on the device: nothing is
    read back until ``reduce`` (once per optimizer step), so a micro-batch never waits for
    the device (a GPU's stream keeps running; issue #16)."""

    losses: list[torch.Tensor] = field(default_factory=list)
    lm_losses: list[torch.Tensor] = field(default_factory=list)
    router_losses: list[torch.Tensor] = field(default_factory=list)
    routing: list[RoutingCounts] = field(default_factory=list)

    def add(self, loss: torch.Tensor, out: Any) -> None:
        """Record one micro-batch: its backpropagated loss and the model's ``MoROutput``."""
        self.losses.append(loss.detach())
        self.lm_losses.append(out.lm_loss.detach())
        self.router_losses.append(out.router_loss.detach())
        if out.routing is not None:
            self.routing.append(out.routing)

    def reduce(self, device: torch.device, with_routing: bool) -> ReducedStep:
        """Average over micro-batches here, then over ranks in a single all-reduce (and one
        read back to the host).

        Routing: active fractions and router losses are averaged, tokens per depth summed
        (as ``RoutingStats.merge``); over ranks all three are averaged, which leaves the shares
        of tokens per depth, and so the mean depth, token-weighted over the global batch.
        """
        means = [torch.stack(v).double().mean() for v in (self.losses, self.lm_losses,
                                                           self.router_losses)]  # fmt: skip
        if not (with_routing and self.routing):
            return ReducedStep(*all_mean(torch.stack(means), device), routing=None)
        first = self.routing[0]
        n_r, keys = len(first.active_fraction), list(first.losses)
        vectors = torch.stack([r.vector() for r in self.routing])  # [micro-batches, K]
        merged = vectors.mean(0)
        merged[n_r : 2 * n_r + 1] = vectors[:, n_r : 2 * n_r + 1].sum(0)  # counts add up
        reduced = all_mean(torch.cat([torch.stack(means).to(merged.device), merged]), device)
        counts = reduced[3 + n_r : 4 + 2 * n_r]
        losses = dict(zip(keys, reduced[4 + 2 * n_r :], strict=True))
        routing = RoutingStats.from_counts(reduced[3 : 3 + n_r], counts, losses)
        return ReducedStep(*reduced[:3], routing=routing)


@dataclass
class Progress:
    """Where the run stands after its last completed step (a checkpoint's client state)."""

    step: int = 0
    tokens: int = 0
    flops: float = 0.0

    def client_state(self) -> dict[str, Any]:
        return {"step": self.step, "tokens": self.tokens, "flops": self.flops}

    @classmethod
    def from_client_state(cls, state: dict[str, Any]) -> Progress:
        return cls(int(state["step"]), int(state["tokens"]), float(state["flops"]))


class StepMeter:
    """Turns a reduced step into the step's metrics and advances the run's ``Progress``."""

    def __init__(
        self,
        cfg: TrainConfig,
        mor_cfg: MoRConfig,
        lr_at: Callable[[int], float],
        world: int,
        peak: float | None,
    ) -> None:
        self.cfg, self.mor_cfg, self.lr_at = cfg, mor_cfg, lr_at
        b = cfg.batch
        self.tokens_per_step = b.micro_batch_size * b.grad_accum_steps * world * cfg.data.seq_len
        self.peak_total = None if peak is None else peak * world  # MFU of the whole job

    def measure(
        self, step: int, red: ReducedStep, step_time: float, progress: Progress
    ) -> dict[str, float]:
        # Training FLOPs count only the tokens each recursion actually ran (MoR §3).
        frac = red.routing.active_fraction if red.routing is not None else None
        step_flops = self.tokens_per_step * training_flops_per_token(
            self.mor_cfg,
            self.cfg.data.seq_len,
            active_fractions=frac,
            convention=self.cfg.budget.convention,
        )
        progress.step = step
        progress.tokens += self.tokens_per_step
        progress.flops += step_flops
        metrics: dict[str, float] = {
            "train/loss": red.loss,
            "train/lm_loss": red.lm_loss,
            "train/router_loss": red.router_loss,
            "train/lr": self.lr_at(step),
            "train/step_time_s": step_time,
            "train/tokens_per_s": self.tokens_per_step / step_time,
            "tokens": float(progress.tokens),
            "flops": progress.flops,
            "step": float(step),
        }
        if not math.isfinite(red.loss):
            metrics["train/diverged"] = 1.0
        if self.peak_total is not None:
            metrics["train/mfu"] = step_flops / step_time / self.peak_total
        if red.routing is not None:
            metrics.update(red.routing.to_metrics())
        return metrics


def check_finite(metrics: dict[str, float], step: int) -> None:
    """Stop a diverged run (after its metrics were logged, so the NaN is on record)."""
    loss = metrics["train/loss"]
    if not math.isfinite(loss):
        raise FloatingPointError(f"training diverged: loss is {loss} at step {step}")


class FlopMilestones:
    """Which steps cross a training-FLOPs milestone (``eval.at_flops``: a sweep's ASHA
    rungs), so the loop validates there and the rung compares every architecture's loss at
    the same compute, not the same step count."""

    def __init__(self, milestones: list[float]) -> None:
        self.milestones = sorted(milestones)
        self._last: float | None = None

    def crossed(self, progress: Progress) -> bool:
        """Whether this step's FLOPs went past a milestone (every rank agrees: FLOPs come
        from the all-reduced routing fractions)."""
        if not self.milestones:
            return False
        prev = self._last
        if prev is None:  # first step of this process (fresh or resumed): its own FLOPs
            prev = progress.flops - progress.flops / max(1, progress.step)
        self._last = progress.flops
        return any(prev < m <= progress.flops for m in self.milestones)
