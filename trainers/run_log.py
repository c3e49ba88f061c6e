"""Rank 0's record of a training run: every step's metrics to MLflow, progress to the console.

Metrics go through ``StepMetricLogger`` (trainers/tracking.py): a step already logged by an
earlier attempt is skipped, and while MLflow is unreachable they wait in the run's spool file.
Other ranks get a ``RunLog`` that does nothing.
"""

from __future__ import annotations

from core.keys import TAG_RESUMED_FROM_STEP
from core.storage import Location
from trainers.plan import TrainPlan

SPOOL_FILE = "metrics_spool.jsonl"


class RunLog:
    def __init__(self, plan: TrainPlan, rank: int, log_every_steps: int) -> None:
        from trainers.tracking import StepMetricLogger

        self.total, self.every = plan.total_steps, log_every_steps
        spool = Location.parse(plan.state_dir).child(SPOOL_FILE)
        self.logger = StepMetricLogger(plan.tracking_uri, plan.run_id, spool) if rank == 0 else None

    def resumed(self, step: int) -> None:
        """Tag the run with the step it resumed from (steps after it are redone)."""
        if self.logger is not None:
            self.logger.set_tag(TAG_RESUMED_FROM_STEP, str(step))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if self.logger is None:
            return
        self.logger.log(step, metrics)
        if step % self.every == 0 or step == self.total:
            print(progress_line(step, self.total, metrics), flush=True)

    def close(self) -> None:
        """Final flush; what cannot be sent stays in the spool for the driver's sync."""
        if self.logger is not None:
            self.logger.close()


def progress_line(step: int, total: int, metrics: dict[str, float]) -> str:
    """The console line of a step: loss, val loss (when measured) and throughput."""
    shown = ", ".join(
        f"{k.split('/')[-1]}={v:.4g}"
        for k, v in metrics.items()
        if k in ("train/loss", "val/loss", "train/tokens_per_s")
    )
    return f"[mor] step {step}/{total} {shown}"
