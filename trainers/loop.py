"""The per-worker training loop: a DeepSpeed engine around an MoR model, on a Ray Train worker.

Each worker reads its own shard of the packed corpus; batches are a pure function of
(seed, micro-batch number), so a run resumed from a checkpoint at step s continues with exactly
the batches it would have seen. Checkpoints are DeepSpeed checkpoints written by every rank into
its own folder and reported together to Ray, which merges them into one checkpoint.
"""

from __future__ import annotations

import math
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from mor.config import MoRConfig
from mor.flops import training_flops_per_token
from mor.model import MoRModel
from trainers.config import TrainConfig
from trainers.data import PackedDataset

# Peak dense bf16 FLOP/s by device name, for MFU; devices not listed get no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """Multiplier of the peak lr at optimizer step ``step`` (1-based)."""
    o = cfg.optim
    warm = math.ceil(o.warmup_fraction * total)
    if step <= warm:
        return step / max(1, warm)
    if o.schedule == "constant":
        return 1.0
    if o.schedule == "cosine":
        progress = min(1.0, (step - warm) / max(1, total - warm))
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    decay = math.ceil(o.decay_fraction * total)  # wsd: the paper's trapezoid
    if step <= total - decay:
        return 1.0
    progress = min(1.0, (step - (total - decay)) / max(1, decay))
    return 1.0 - (1.0 - o.min_lr_ratio) * progress


class BatchSampler:
    """Micro-batch m of a rank: samples from a per-epoch permutation of the rank's shard."""

    def __init__(self, dataset: PackedDataset, micro_batch: int, seed: int) -> None:
        self.ds, self.mb, self.seed = dataset, micro_batch, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def _epoch_perm(self, epoch: int) -> np.ndarray:
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm = (epoch, rng.permutation(len(self.ds)))
        return self._perm[1]

    def batch(self, m: int) -> torch.Tensor:
        n = len(self.ds)
        rows = []
        for offset in range(m * self.mb, (m + 1) * self.mb):
            epoch, i = divmod(offset, n)
            rows.append(self.ds[int(self._epoch_perm(epoch)[i])])
        return torch.stack(rows)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def choose_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.deepspeed.precision != "auto":
        return cfg.deepspeed.precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(cfg: TrainConfig, precision: str) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": cfg.batch.micro_batch_size,
        "gradient_accumulation_steps": cfg.batch.grad_accum_steps,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.deepspeed.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        # A plain torch AdamW: no JIT-compiled optimizer ops are needed (CPU-friendly).
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
    }


def all_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


@torch.no_grad()
def validation_loss(
    model: MoRModel, val: PackedDataset, micro_batch: int, batches: int, device: torch.device
) -> float:
    """Mean next-token loss over the first ``batches`` val micro-batches, inference routing."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(batches):
        idx = [(b * micro_batch + i) % len(val) for i in range(micro_batch)]
        x = torch.stack([val[i] for i in idx]).to(device)
        total += float(model(x, labels=x).lm_loss)
        count += 1
    model.train(was_training)
    return total / max(1, count)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point. ``config`` = {"train": TrainConfig dict, "plan": run plan}."""
    import deepspeed
    import ray.train

    from mor.checkpoint import save_pretrained
    from trainers.tracking import StepMetricLogger

    cfg = TrainConfig.model_validate(config["train"])
    plan = config["plan"]
    mor_cfg = MoRConfig.model_validate(plan["model"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    if torch.cuda.is_available() and plan["use_gpu"]:
        device = torch.device("cuda", ctx.get_local_rank())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    precision = choose_precision(cfg, device)
    state_dir = Path(plan["state_dir"])
    state_dir.mkdir(parents=True, exist_ok=True)
    # Which process is which rank: operators (and the fault tests) can signal a worker.
    (state_dir / f"worker_rank{rank}.pid").write_text(str(os.getpid()))
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank

    model = MoRModel(mor_cfg)
    total_steps = int(plan["total_steps"])
    optimizer = torch.optim.AdamW(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.lr,
        betas=cfg.optim.betas,
        eps=cfg.optim.eps,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i + 1, total_steps, cfg)
    )
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision),
        dist_init_required=False,
    )
    module: MoRModel = engine.module

    seq_len = cfg.data.seq_len
    train_ds = PackedDataset(Path(plan["train_path"]), seq_len, rank, world)
    val_ds = PackedDataset(Path(plan["val_path"]), seq_len, rank, world)
    sampler = BatchSampler(train_ds, cfg.batch.micro_batch_size, cfg.seed + 1000 * rank)

    step, tokens, flops = 0, 0, 0.0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        client_state = restore_latest_good(engine, checkpoint, device)
        if client_state is None:
            checkpoint = None
        else:
            step, tokens = client_state["step"], client_state["tokens"]
            flops = client_state["flops"]
            if rank == 0:
                print(f"[mor] resumed from checkpoint at step {step}")
    spool = Path(plan["state_dir"]) / "metrics_spool.jsonl"
    logger = StepMetricLogger(plan["tracking_uri"], plan["run_id"], spool) if rank == 0 else None
    if logger is not None and checkpoint is not None:
        logger.set_tag("mor.resumed_from_step", str(step))
    ga, mb = cfg.batch.grad_accum_steps, cfg.batch.micro_batch_size
    tokens_per_step = mb * ga * world * seq_len
    peak = next(
        (
            v
            for k, v in PEAK_FLOPS.items()
            if device.type == "cuda" and k in torch.cuda.get_device_name(device)
        ),
        None,
    )

    while step < total_steps:
        step += 1
        fail = cfg.fault_injection.fail_at_step
        marker = state_dir / f"fault_injected_step{fail}"
        if fail == step and rank == 0 and not marker.exists():
            marker.write_text("injected")
            raise RuntimeError(f"fault injection: failing before step {step}")
        t0 = time.perf_counter()
        losses, lm_losses, router_losses = [], [], []
        fractions = np.zeros(mor_cfg.num_recursions)
        depth_counts = np.zeros(mor_cfg.num_recursions + 1)
        for a in range(ga):
            x = sampler.batch((step - 1) * ga + a).to(device)
            out = engine(x, labels=x)
            if cfg.fault_injection.nan_at_step == step:
                out.loss = out.loss * float("nan")
            engine.backward(out.loss)
            engine.step()
            losses.append(out.loss.item())
            lm_losses.append(out.lm_loss.item())
            router_losses.append(out.router_loss.item())
            if out.stats is not None:
                fractions += np.array(out.stats.active_fraction) / ga
                depth_counts += np.array(out.stats.tokens_per_depth)
        if mor_cfg.router == "token_choice" and mor_cfg.balancing == "loss_free":
            if dist.is_initialized():  # every rank must apply the same bias update
                dist.all_reduce(module.router._load)
            module.update_router_bias()
        step_time = time.perf_counter() - t0

        reduced = all_mean(
            [
                np.mean(losses),
                np.mean(lm_losses),
                np.mean(router_losses),
                *fractions.tolist(),
                *depth_counts.tolist(),
            ],
            device,
        )
        loss, lm_loss, router_loss = reduced[:3]
        frac = reduced[3 : 3 + mor_cfg.num_recursions] if mor_cfg.sharing != "none" else None
        step_flops = tokens_per_step * training_flops_per_token(
            mor_cfg, seq_len, active_fractions=frac, convention=cfg.budget.convention
        )
        tokens += tokens_per_step
        flops += step_flops
        metrics: dict[str, float] = {
            "train/loss": loss,
            "train/lm_loss": lm_loss,
            "train/router_loss": router_loss,
            "train/lr": cfg.optim.lr * lr_factor(step, total_steps, cfg),
            "train/step_time_s": step_time,
            "train/tokens_per_s": tokens_per_step / step_time,
            "tokens": float(tokens),
            "flops": flops,
            "step": float(step),
        }
        if not math.isfinite(loss):
            metrics["train/diverged"] = 1.0
        if peak is not None:
            metrics["train/mfu"] = step_flops / step_time / (peak * world)
        if frac is not None:
            counts = np.array(reduced[3 + mor_cfg.num_recursions :])
            shares = counts / max(1.0, counts.sum())
            for r, f in enumerate(frac):
                metrics[f"router/active_r{r + 1}"] = f
            for d, s in enumerate(shares):
                metrics[f"router/frac_depth_{d}"] = float(s)
            metrics["router/mean_depth"] = float((shares * np.arange(len(shares))).sum())
            metrics["router/dead_frac"] = float(shares[0])  # tokens that ran no recursion
        last = step == total_steps
        if step % cfg.eval.every_steps == 0 or last:
            vl = validation_loss(module, val_ds, mb, cfg.eval.batches, device)
            metrics["val/loss"] = all_mean([vl], device)[0]
        if logger is not None:
            logger.log(step, metrics)
            if step % cfg.log_every_steps == 0 or last:
                shown = ", ".join(
                    f"{k.split('/')[-1]}={v:.4g}"
                    for k, v in metrics.items()
                    if k in ("train/loss", "val/loss", "train/tokens_per_s")
                )
                print(f"[mor] step {step}/{total_steps} {shown}", flush=True)
        if not math.isfinite(loss):
            raise FloatingPointError(f"training diverged: loss is {loss} at step {step}")

        if step % cfg.checkpoint.every_steps == 0 or last:
            with tempfile.TemporaryDirectory() as tmp:
                engine.save_checkpoint(
                    tmp,
                    tag=f"step{step}",
                    client_state={"step": step, "tokens": tokens, "flops": flops},
                )
                if last:
                    state = _full_state_dict(engine, cfg.deepspeed.zero_stage)
                    if rank == 0:
                        save_pretrained(
                            Path(tmp) / "export",
                            mor_cfg,
                            state,
                            meta=plan["meta"]
                            | {
                                "step": step,
                                "tokens": tokens,
                                "train_flops": flops,
                                "val_loss": metrics.get("val/loss"),
                            },
                            tokenizer_path=plan["tokenizer_path"],
                        )
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif step % cfg.report_every_steps == 0 or "val/loss" in metrics:
            ray.train.report(metrics)
    if logger is not None:
        logger.close()


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


def _full_state_dict(engine: Any, zero_stage: int) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (ZeRO-3 parameters are gathered from all ranks first)."""
    module = engine.module
    if zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().float().cpu().clone() for k, v in module.state_dict().items()}
