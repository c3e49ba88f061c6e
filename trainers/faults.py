"""Deliberate faults at named points of the training loop (``cfg.fault_injection``).

This hook exists for the reliability tests (tests/test_reliability.py, tests/test_trainer.py)
and for operators' chaos drills: a run that crashes once before a given step must resume from
its latest good checkpoint without gaps or repeats in its metrics, and a run whose loss turns
NaN must stop with a 'training diverged' reason. With ``fault_injection`` left empty (the
default) every hook is a no-op and the loop behaves exactly as without it.
"""

from __future__ import annotations

import torch

from core.storage import Location
from trainers.config import FaultInjection


class FaultInjector:
    """The loop calls ``before_step`` at the start of each optimizer step and ``on_loss`` on each
    micro-batch's loss before the backward pass."""

    def __init__(self, cfg: FaultInjection, home: Location, rank: int) -> None:
        self.cfg, self.home, self.rank = cfg, home, rank

    def before_step(self, step: int) -> None:
        """``fail_at_step``: rank 0 raises before the step runs, once per run (a marker file in
        the run's state folder keeps the restarted or rerun attempt from failing again)."""
        fail = self.cfg.fail_at_step
        if fail != step or self.rank != 0:
            return
        marker = self.home.child(f"fault_injected_step{fail}")
        if marker.exists():
            return
        marker.write_text("injected")
        raise RuntimeError(f"fault injection: failing before step {step}")

    def on_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """``nan_at_step``: the loss (and so the gradients and the logged loss) becomes NaN."""
        if self.cfg.nan_at_step == step:
            return loss * float("nan")
        return loss
