"""Rank 0's record of a training run: every step's metrics to MLflow, progress to the console.

Metrics go through ``StepMetricLogger`` (trainers/tracking.py): a step already logged by an
earlier attempt is skipped, and while MLflow is unreachable they wait in the run's spool file.
Rank 0 also samples its node's system metrics (CPU, memory, GPUs: ``core.system_metrics``)
into the run. Other ranks get a ``RunLog`` that does nothing.

The console gets one line per ``log_every_steps`` (and the last step), e.g.

[mor] r1 step 50/200 (25%) 0:41 elapsed, ETA 2:03 | train_loss 5.912 | val_loss 5.874 | 3,120 tok/s

``val_loss`` only on steps where validation ran; ``| MFU 1.2%`` only where the device's peak
is known.
"""

from __future__ import annotations

import sys
import time

from core.keys import TAG_RESUMED_FROM_STEP
from core.storage import Location
from core.system_metrics import SystemMetricsSampler, live_sink, next_step
from trainers.plan import TrainPlan

SPOOL_FILE = "metrics_spool.jsonl"


class RunLog:
    def __init__(self, plan: TrainPlan, rank: int, log_every_steps: int, name: str = "") -> None:
        """``name`` starts each console line: the run's MLflow name (a sweep's trials run
        side by side)."""
        from trainers.tracking import StepMetricLogger

        self.total, self.every, self.name = plan.total_steps, log_every_steps, name
        spool = Location.parse(plan.state_dir).child(SPOOL_FILE)
        self.logger = StepMetricLogger(plan.tracking_uri, plan.run_id, spool) if rank == 0 else None
        self.clock = ProgressClock(plan.total_steps)
        self.system: SystemMetricsSampler | None = None
        if rank == 0:  # a resumed run continues its series
            uri, run_id = plan.tracking_uri, plan.run_id
            sink = live_sink(uri, run_id)
            self.system = SystemMetricsSampler(sink, first_step=next_step(uri, run_id)).start()

    def resumed(self, step: int) -> None:
        """Tag the run with the step it resumed from (steps after it are redone)."""
        self.clock = ProgressClock(self.total, first_step=step)
        if self.logger is not None:
            self.logger.set_tag(TAG_RESUMED_FROM_STEP, str(step))

    def describe(self, tags: dict[str, str]) -> None:
        """Tag the run with how its workers run (optimizer kernel, precision) and say so once
        on the console."""
        if self.logger is None:
            return
        for key, value in tags.items():
            self.logger.set_tag(key, value)
        parts = ", ".join(f"{k.removeprefix('mor.')} {v}" for k, v in tags.items())
        sys.stdout.write(f"[mor] {self.name + ': ' if self.name else ''}{parts}\n")
        sys.stdout.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is None:
            return
        self.logger.log(step, metrics)
        if step % self.every == 0 or step == self.total:
            elapsed, eta = self.clock.at(step)
            line = progress_line(step, self.total, metrics, elapsed, eta, self.name)
            # Written, not print()ed: Ray Train's print patch, where it is on, would send a
            # print both to stdout and to its console logger (every line twice).
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

    def stop_system_metrics(self) -> None:
        """The last system-metrics sample; also when the run fails (no sampling after it)."""
        if self.system is not None:
            self.system.stop()
            self.system = None

    def close(self) -> None:
        """Final flush; what cannot be sent stays in the spool for the driver's sync."""
        self.stop_system_metrics()
        if self.logger is not None:
            self.logger.close()


class ProgressClock:
    """Elapsed time of this attempt and the ETA at its mean step time so far."""

    def __init__(self, total: int, first_step: int = 0) -> None:
        self.total, self.first, self.start = total, first_step, time.monotonic()

    def at(self, step: int) -> tuple[float, float | None]:
        elapsed = time.monotonic() - self.start
        done = step - self.first
        eta = elapsed / done * (self.total - step) if done > 0 else None
        return elapsed, eta


def _clock(seconds: float) -> str:
    """0:41, 12:05, 1:02:03."""
    s = round(seconds)
    h, m = divmod(s // 60, 60)
    return f"{h}:{m:02d}:{s % 60:02d}" if h else f"{m}:{s % 60:02d}"


def progress_line(
    step: int,
    total: int,
    metrics: dict[str, float],
    elapsed: float | None = None,
    eta: float | None = None,
    name: str = "",
) -> str:
    """The console line of a step: step/total, elapsed and ETA, train loss, val loss (when
    measured), throughput and MFU (when known)."""
    head = f"[mor] {name + ' ' if name else ''}step {step}/{total} ({100 * step // total}%)"
    if elapsed is not None:
        head += f" {_clock(elapsed)} elapsed" + (f", ETA {_clock(eta)}" if eta is not None else "")
    parts = [head]
    if "train/loss" in metrics:
        parts.append(f"train_loss {metrics['train/loss']:.4g}")
    if "val/loss" in metrics:
        parts.append(f"val_loss {metrics['val/loss']:.4g}")
    if "train/tokens_per_s" in metrics:
        parts.append(f"{metrics['train/tokens_per_s']:,.0f} tok/s")
    if "train/mfu" in metrics:
        parts.append(f"MFU {100 * metrics['train/mfu']:.2g}%")
    return " | ".join(parts)
