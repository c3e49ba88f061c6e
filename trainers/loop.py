"""The per-worker training loop: a DeepSpeed engine around an MoR model, on a Ray Train worker.

``Trainer.train`` reads as the recipe: each optimizer step runs named components in order:

    faults.before_step → optimizer_step (grad accumulation) → reduce + StepMeter (metrics)
    → validation (when due) → RunLog (MLflow + console) → check_finite → Checkpointer (Ray)

Where each lives: engine set-up, batch sampling, the optimizer step and validation in
trainers/components.py; metrics, MFU and router metrics in trainers/step_metrics.py; MLflow and
console logging in trainers/run_log.py; checkpoints, the export, Ray reports and resuming in
trainers/checkpointing.py; the test-only fault hook in trainers/faults.py.
"""

from __future__ import annotations

import time
from typing import Any

from core.keys import TAG_OPTIMIZER, TAG_PRECISION
from core.quiet import honour_lost_sigterm, quiet_worker
from core.storage import Location
from trainers.checkpointing import Checkpointer, resume
from trainers.components import (
    BatchSampler,
    Worker,
    build_engine,
    choose_precision,
    lr_factor,
    optimizer_name,
    optimizer_step,
    validation_metrics,
)
from trainers.config import TrainConfig
from trainers.faults import FaultInjector
from trainers.plan import TrainPlan
from trainers.run_log import RunLog
from trainers.run_store import RunStore
from trainers.step_metrics import (
    FlopMilestones,
    Progress,
    StepMeter,
    all_mean,
    check_finite,
    peak_flops,
)
from trainers.windows import open_windows


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` = {"train": TrainConfig dict, "plan": TrainPlan dict}."""
    cfg = TrainConfig.model_validate(config["train"])
    plan = TrainPlan.model_validate(config["plan"])
    Trainer(cfg, plan).train()


class Trainer:
    """One worker's share of a training run, set up from the config and the driver's plan."""

    def __init__(self, cfg: TrainConfig, plan: TrainPlan) -> None:
        self.cfg, self.plan = cfg, plan
        quiet_worker()  # DeepSpeed's info logs off unless --verbose / MOR_VERBOSE=1
        honour_lost_sigterm()  # Ray's SIGTERM exits even if it lands in a weakref callback
        home = Location.parse(plan.state_dir)
        self.worker = w = Worker.start(cfg, plan.use_gpu, home)
        self.engine = build_engine(cfg, plan.model, plan.total_steps, w.device)
        seq, mb = cfg.data.seq_len, cfg.batch.micro_batch_size
        train_ds = open_windows(plan.data, "train", seq, w.rank, w.world)
        self.val_ds = open_windows(plan.data, "val", seq, w.rank, w.world)
        # One seed for all ranks: they share the epoch's order, each taking its positions.
        self.sampler = BatchSampler(train_ds, mb, cfg.seed)
        self.faults = FaultInjector(cfg.fault_injection, home, w.rank)
        self.meter = StepMeter(
            cfg,
            plan.model,
            lambda step: cfg.optim.lr * lr_factor(step, plan.total_steps, cfg),
            w.world,
            peak_flops(w.device_name()),
        )
        self.checkpointer = Checkpointer(cfg, plan, w.rank)
        self.milestones = FlopMilestones(cfg.eval.at_flops)

    def train(self) -> None:
        """Resume if Ray holds a checkpoint, then run the remaining optimizer steps."""
        cfg, total, device = self.cfg, self.plan.total_steps, self.worker.device
        restored = resume(self.engine, device, self.worker.rank, RunStore.of(cfg).ray_run_dir)
        progress = restored or Progress()
        title = cfg.tracking.tags.get("mlflow.runName", cfg.name)  # a sweep trial's variant
        log = RunLog(self.plan, self.worker.rank, cfg.log_every_steps, title)
        if restored is not None:
            log.resumed(restored.step)
        log.describe(
            {
                TAG_OPTIMIZER: optimizer_name(self.engine),
                TAG_PRECISION: choose_precision(cfg, device),
            }
        )
        # Router metrics (and FLOPs at the measured active fractions) only for recursive models.
        with_routing = self.plan.model.sharing != "none"
        try:
            while progress.step < total:
                self.step(progress, log, with_routing)
        finally:
            log.stop_system_metrics()
        log.close()

    def step(self, progress: Progress, log: RunLog, with_routing: bool) -> None:
        """One optimizer step with its metrics, validation (when due) and checkpoint."""
        cfg, total, device = self.cfg, self.plan.total_steps, self.worker.device
        step = progress.step + 1
        last = step == total
        self.faults.before_step(step)
        t0 = time.perf_counter()
        totals = optimizer_step(
            self.engine, self.sampler, step, cfg.batch.grad_accum_steps, device, self.faults
        )
        step_time = time.perf_counter() - t0
        reduced = totals.reduce(device, with_routing)
        metrics = self.meter.measure(step, reduced, step_time, progress)
        if step % cfg.eval.every_steps == 0 or last or self.milestones.crossed(progress):
            metrics.update(self.validate())
        log.log(step, metrics)
        check_finite(metrics, step)
        self.checkpointer.after_step(self.engine, progress, metrics, last)

    def validate(self) -> dict[str, float]:
        """Held-out loss (and routing drift) of this rank's validation batches, averaged over
        ranks."""
        cfg, device = self.cfg, self.worker.device
        metrics = validation_metrics(
            self.engine.module, self.val_ds, cfg.batch.micro_batch_size, cfg.eval.batches, device
        )
        return dict(zip(metrics, all_mean(list(metrics.values()), device), strict=True))
