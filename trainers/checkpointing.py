"""Checkpoints, the export and Ray reports of a training worker, and resuming from them.

Checkpoints are DeepSpeed checkpoints written by every rank into its own folder and reported
together to Ray, which merges them into one checkpoint. The last step's checkpoint also holds
the export (consolidated weights, config, tokenizer) that the driver copies out.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from trainers.config import TrainConfig
from trainers.plan import TrainPlan
from trainers.step_metrics import Progress, all_mean


class Checkpointer:
    """Reports each step to Ray: with a checkpoint every ``checkpoint.every_steps`` and at the
    end (then with the export), otherwise metrics alone every ``report_every_steps`` or when a
    validation loss was measured. A step that crosses a FLOPs milestone (``eval.at_flops``)
    is validated here if the loop did not, so the report an ASHA rung reads carries the loss
    measured at that compute, not at some later step."""

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, rank: int) -> None:
        self.cfg, self.plan, self.rank = cfg, plan, rank
        self._milestones = sorted(cfg.eval.at_flops)
        self._last_flops: float | None = None
        self._val: Any = None

    def _crossed_milestone(self, progress: Progress) -> bool:
        """Whether this step's FLOPs went past a milestone (every rank agrees: the FLOPs
        come from the all-reduced routing fractions)."""
        if not self._milestones:
            return False
        prev = self._last_flops
        if prev is None:  # first step of this process (fresh or resumed): its own FLOPs
            prev = progress.flops - progress.flops / max(1, progress.step)
        self._last_flops = progress.flops
        return any(prev < m <= progress.flops for m in self._milestones)

    def _milestone_validation(self, engine: Any) -> dict[str, float]:
        from trainers.components import validation_metrics
        from trainers.data import PackedDataset

        cfg = self.cfg
        if self._val is None:
            world = dist.get_world_size() if dist.is_initialized() else 1
            self._val = PackedDataset(Path(self.plan.val_path), cfg.data.seq_len, self.rank, world)
        device = next(engine.module.parameters()).device
        metrics = validation_metrics(
            engine.module, self._val, cfg.batch.micro_batch_size, cfg.eval.batches, device
        )
        return dict(zip(metrics, all_mean(list(metrics.values()), device), strict=True))

    def after_step(
        self, engine: Any, progress: Progress, metrics: dict[str, float], last: bool
    ) -> None:
        import ray.train

        step = progress.step
        if self._crossed_milestone(progress) and "val/loss" not in metrics:
            metrics.update(self._milestone_validation(engine))
        if step % self.cfg.checkpoint.every_steps == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(tmp, tag=f"step{step}", client_state=progress.client_state())
                if last:
                    self.export(engine, Path(tmp) / "export", progress, metrics)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif step % self.cfg.report_every_steps == 0 or "val/loss" in metrics:
            ray.train.report(metrics)

    def export(
        self, engine: Any, path: Path, progress: Progress, metrics: dict[str, float]
    ) -> None:
        """Consolidated fp32 weights (gathered on every rank), written by rank 0."""
        from mor.checkpoint import save_pretrained

        state = full_state_dict(engine, self.cfg.deepspeed.zero_stage)
        if self.rank != 0:
            return
        meta = self.plan.meta | {
            "step": progress.step,
            "tokens": progress.tokens,
            "train_flops": progress.flops,
            "val_loss": metrics.get("val/loss"),
        }
        save_pretrained(
            path, self.plan.model, state, meta=meta, tokenizer_path=self.plan.tokenizer_path
        )


def resume(engine: Any, device: torch.device, rank: int) -> Progress | None:
    """Restore the run from Ray's latest checkpoint (or an older good one); None: start fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    client_state = restore_latest_good(engine, checkpoint, device)
    if client_state is None:
        return None
    progress = Progress.from_client_state(client_state)
    if rank == 0:
        print(f"[mor] resumed from checkpoint at step {progress.step}")
    return progress


def _candidates(checkpoint: Any) -> list[Path]:
    """The reported checkpoint first, then older ones of the same run (local storage only)."""
    latest = Path(checkpoint.path)
    if getattr(checkpoint.filesystem, "type_name", "local") != "local" or not latest.is_dir():
        return []
    older = sorted(
        (p for p in latest.parent.glob("checkpoint_*") if p.is_dir() and p != latest),
        key=lambda p: p.name,
        reverse=True,
    )  # names embed their creation time
    return [latest, *older]


def restore_latest_good(engine: Any, checkpoint: Any, device: torch.device) -> dict | None:
    """Load the newest checkpoint every rank can read; fall back to older ones with a warning.

    A corrupt or partial checkpoint (a truncated file, a missing shard, no 'latest' tag) must
    not end the run: all ranks try the same candidate and agree (all-reduce) before using it.
    """
    candidates = _candidates(checkpoint)
    if not candidates:  # remote storage: only the reported checkpoint is reachable
        with checkpoint.as_directory() as ckpt_dir:
            _, state = engine.load_checkpoint(ckpt_dir)
        return state
    for i, path in enumerate(candidates):
        state, error = None, None
        try:
            load_path, state = engine.load_checkpoint(str(path))
            if load_path is None or not state or "step" not in state:
                raise RuntimeError("no loadable DeepSpeed checkpoint (missing 'latest' tag?)")
        except Exception as exc:
            error = exc
        ok = all_mean([0.0 if error else 1.0], device)[0] == 1.0
        if ok:
            return state
        warnings.warn(
            f"checkpoint {path.name} is unusable ({error or 'on another rank'}); "
            f"falling back to {'an older one' if i + 1 < len(candidates) else 'scratch'}",
            stacklevel=2,
        )
        print(f"[mor] WARNING: checkpoint {path.name} unusable: {error or 'on another rank'}")
    return None


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (ZeRO-3 parameters are gathered from all ranks first)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
