"""Checkpoints, the export and Ray reports of a training worker, and resuming from them.

Checkpoints are DeepSpeed checkpoints written by every rank into its own folder and reported
together to Ray, which merges them into one checkpoint. The last step's checkpoint also holds
the export (consolidated weights, config, tokenizer) that the driver copies out.

A checkpoint is untrusted input on resume (issue 19: a payload added to DeepSpeed's
``mp_rank_00_model_states.pt`` ran on resume, DeepSpeed loading with ``weights_only=False``).
Two layers keep it from running code:

- Each rank writes a manifest of the SHA-256 of every file it wrote (``mor_manifest_rank*.json``,
  inside the checkpoint, so it travels wherever Ray stores it). Before DeepSpeed reads anything
  the checkpoint is verified against it: a changed, missing, extra or unlisted file makes the
  checkpoint unusable (the corrupt-checkpoint fallback below; the reason names the file). This
  also catches torn writes.
- Whatever passes is loaded with PyTorch's ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` (tensors and plain
  containers only) plus an allow-list of the four DeepSpeed classes its files hold (checked for
  ZeRO 0-3, fp32 and bf16). A manifest lives next to the files, so someone who can rewrite one
  can rewrite the other: the weights-only load is what guarantees no code runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from core.storage import Location
from trainers.config import TrainConfig
from trainers.plan import TrainPlan
from trainers.step_metrics import Progress, all_mean
from trainers.writer_lock import pid_alive

MANIFEST_PREFIX = "mor_manifest_rank"
TMP_PREFIX = "mor-ckpt-"  # <tmp>/mor-ckpt-<pid>-*: a rank's checkpoint before Ray copies it
SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train's record of a run's checkpoints


class CheckpointIntegrityError(RuntimeError):
    """A checkpoint does not match the manifest the platform wrote with it."""


class Checkpointer:
    """Reports each step to Ray: with a checkpoint every ``checkpoint.every_steps`` and at the
    end (then with the export), otherwise metrics alone every ``report_every_steps`` or when a
    validation loss was measured (also at each ``eval.at_flops`` milestone, so the report an
    ASHA rung reads carries the loss measured at that compute)."""

    def __init__(self, cfg: TrainConfig, plan: TrainPlan, rank: int) -> None:
        self.cfg, self.plan, self.rank = cfg, plan, rank
        clean_leaked_temp_dirs()

    def after_step(
        self, engine: Any, progress: Progress, metrics: dict[str, float], last: bool
    ) -> None:
        import ray.train

        step = progress.step
        if step % self.cfg.checkpoint.every_steps == 0 or last:
            # Named by pid: a worker killed mid-save leaks it; the next start removes it.
            with tempfile.TemporaryDirectory(prefix=f"{TMP_PREFIX}{os.getpid()}-") as tmp:
                engine.save_checkpoint(tmp, tag=f"step{step}", client_state=progress.client_state())
                if last:
                    self.export(engine, Path(tmp) / "export", progress, metrics)
                write_manifest(Path(tmp), self.rank)
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
        # The tokenizer lives beside the data, which may be in an object store.
        tokenizer = Location.parse(self.plan.tokenizer_path).local_copy(
            Path(tempfile.gettempdir()) / "mor-tokenizers"
        )
        save_pretrained(path, self.plan.model, state, meta=meta, tokenizer_path=tokenizer)


def resume(
    engine: Any, device: torch.device, rank: int, run_dir: Path | None = None
) -> Progress | None:
    """Restore the run from Ray's latest checkpoint, or the newest intact one of ``run_dir``
    (when Ray's own record of them was torn or dropped); None: start fresh."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None and getattr(checkpoint.filesystem, "type_name", "local") != "local":
        client_state = _restore_remote(engine, checkpoint)  # only that one is reachable
    else:
        client_state = restore_latest_good(engine, _candidates(checkpoint, run_dir), device)
    if client_state is None:
        return None
    progress = Progress.from_client_state(client_state)
    if rank == 0:
        print(f"[mor] resumed from checkpoint at step {progress.step}")
    return progress


def _candidates(checkpoint: Any, run_dir: Path | None) -> list[Path]:
    """The reported checkpoint first (if its folder still exists), then the older ones."""
    latest = Path(checkpoint.path) if checkpoint is not None else None
    folder = latest.parent if latest is not None else run_dir
    if folder is None or not folder.is_dir():
        return []
    older = sorted(
        (p for p in folder.glob("checkpoint_*") if p.is_dir() and p != latest),
        key=lambda p: p.name,
        reverse=True,
    )  # names embed their creation time
    return ([latest] if latest is not None and latest.is_dir() else []) + older


def _restore_remote(engine: Any, checkpoint: Any) -> dict | None:
    with checkpoint.as_directory() as ckpt_dir:
        verify_manifest(Path(ckpt_dir))  # no older checkpoint to fall back to: refuse
        with weights_only_load():
            _, state = engine.load_checkpoint(ckpt_dir)
    return state


def restore_latest_good(engine: Any, candidates: list[Path], device: torch.device) -> dict | None:
    """Load the newest checkpoint every rank can read; fall back to older ones with a warning.

    A corrupt, partial or tampered checkpoint (a truncated or changed file, a missing shard, no
    'latest' tag, a file not in its manifest) must not end the run: all ranks try the same
    candidate and agree (all-reduce) before using it.
    """
    for i, path in enumerate(candidates):
        state, error = None, None
        try:
            verify_manifest(path)  # before DeepSpeed unpickles anything
            with weights_only_load():
                load_path, state = engine.load_checkpoint(str(path))
            if load_path is None or not state or "step" not in state:
                raise RuntimeError("no loadable DeepSpeed checkpoint (missing 'latest' tag?)")
        except Exception as exc:
            error = _reason(exc)
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


def _reason(exc: Exception) -> str:
    """One line; PyTorch's weights-only refusal (whose first line suggests loading the file
    unsafely) becomes what it means here."""
    text = str(exc)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL (\S+)", text)
        what = found.group(1) if found else "a non-tensor object"
        return f"refused to unpickle {what} (not weights; the checkpoint may be tampered)"
    return (text.strip().splitlines() or [type(exc).__name__])[0][:300]


# ------------------------------------------------------------------ integrity
def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files(folder: Path) -> dict[str, Path]:
    """Every file under ``folder`` (links included, so none can hide), by relative path."""
    return {
        p.relative_to(folder).as_posix(): p
        for p in folder.rglob("*")
        if (p.is_file() or p.is_symlink())
        and not (p.parent == folder and p.match(f"{MANIFEST_PREFIX}*.json"))
    }


def write_manifest(folder: Path, rank: int) -> Path:
    """This rank's manifest: the SHA-256 of every file it wrote into ``folder``."""
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    files = {rel: _sha256(p) for rel, p in sorted(_files(folder).items())}
    path = folder / f"{MANIFEST_PREFIX}{rank}.json"
    path.write_text(json.dumps({"rank": rank, "world": world, "sha256": files}, indent=1))
    return path


def verify_manifest(folder: Path) -> None:
    """The checkpoint holds exactly the files its ranks' manifests list, each with its digest;
    otherwise a ``CheckpointIntegrityError`` naming the first offending file."""
    manifests = sorted(folder.glob(f"{MANIFEST_PREFIX}*.json"))
    if not manifests:
        raise CheckpointIntegrityError(
            f"{folder.name}: no {MANIFEST_PREFIX}*.json (not written by this platform, or "
            "by a version before checkpoint manifests): refusing to load it"
        )
    expected: dict[str, str] = {}
    ranks, world = set(), 0
    for m in manifests:
        try:
            data = json.loads(m.read_text())
            ranks.add(int(data["rank"]))
            world = int(data["world"])
            expected.update({str(k): str(v) for k, v in data["sha256"].items()})
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointIntegrityError(f"{m}: unreadable manifest ({exc})") from None
    if ranks != set(range(world)):
        raise CheckpointIntegrityError(f"{folder}: manifests of ranks {sorted(ranks)} of {world}")
    actual = _files(folder)
    for rel in sorted(set(actual) | set(expected)):
        if rel not in expected:
            raise CheckpointIntegrityError(f"{folder.name}/{rel}: not in the checkpoint's manifest")
        if rel not in actual:
            raise CheckpointIntegrityError(f"{folder.name}/{rel}: missing (listed in the manifest)")
        if actual[rel].is_symlink() or _sha256(actual[rel]) != expected[rel]:
            raise CheckpointIntegrityError(
                f"{folder.name}/{rel}: does not match its SHA-256 in the manifest (tampered, torn)"
            )


def _deepspeed_safe_globals() -> list[type]:
    """The non-tensor classes DeepSpeed's checkpoint files hold (ZeRO 0-3, fp32 and bf16,
    DeepSpeed 0.19): restored from their fields, never by calling arbitrary code."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_load() -> Iterator[None]:
    """Every ``torch.load`` inside (DeepSpeed passes ``weights_only=False``) is weights-only,
    with DeepSpeed's classes allowed: PyTorch's own switch, so no DeepSpeed path escapes it."""
    key = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    before = os.environ.get(key)
    os.environ[key] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_safe_globals()):
            yield
    finally:
        if before is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = before


# ------------------------------------------------------------------ start-up tidying
def clean_leaked_temp_dirs() -> list[Path]:
    """Remove this node's checkpoint staging folders whose worker process is gone (a full
    DeepSpeed state each, left by a kill between save and Ray's copy)."""
    removed = []
    for path in Path(tempfile.gettempdir()).glob(f"{TMP_PREFIX}*"):
        pid = path.name[len(TMP_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def tidy_run_dir(run_dir: Path | None, keep: int) -> None:
    """Before Ray starts (and after it ends): set aside a torn Ray snapshot (or one naming a
    deleted checkpoint folder; Ray would fail on it) so the workers fall back to the newest
    intact folder themselves, and keep at most ``keep`` checkpoint folders across restarts."""
    if run_dir is None or not run_dir.is_dir():
        return
    snapshot = run_dir / SNAPSHOT
    referenced: set[str] = set()
    if snapshot.exists():
        try:
            data = json.loads(snapshot.read_text())
            referenced = {r["checkpoint_dir_name"] for r in data["checkpoint_results"]}
            latest = data.get("latest_checkpoint_result") or {}
            referenced |= {latest["checkpoint_dir_name"]} if latest else set()
            missing = [n for n in sorted(referenced) if not (run_dir / n).is_dir()]
            if missing:
                raise ValueError(f"checkpoint folder {missing[0]} is gone")
        except (ValueError, KeyError, TypeError) as exc:
            aside = snapshot.with_name(f"{SNAPSHOT}.unusable-{int(time.time())}")
            snapshot.rename(aside)
            referenced = set()
            print(
                f"[mor] WARNING: Ray's checkpoint record is unusable ({exc}); set aside as "
                f"{aside.name}; resuming from the newest intact checkpoint folder"
            )
    folders = sorted((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.name)
    for old in folders[:-keep]:
        if old.name not in referenced:  # Ray deletes those it knows about itself
            shutil.rmtree(old, ignore_errors=True)


def full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (ZeRO-3 parameters are gathered from all ranks first)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
