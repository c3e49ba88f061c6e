"""Benchmark 5: platform overhead of Ray Train + DeepSpeed, and of a Ray Tune sweep.

a. The same model and micro-batch trained (i) by ``trainers.launcher.run_training`` (Ray Train,
   1 worker, DeepSpeed ZeRO-2, MLflow logging) and (ii) by a bare PyTorch loop (AdamW, gradient
   clipping) with the same thread count. Per-step time: the worker's ``train/step_time_s``
   (from MLflow's metric history; the first steps are warm-up) vs the bare loop's; end to end:
   ``run_training``'s wall time (Ray start-up, data preparation, DeepSpeed set-up, checkpoint
   and export) vs the bare loop's.
b. A 2-trial sweep (``sweeps.driver.run_sweep``; vanilla vs MoR, like the test suite's tiny
   sweep): wall time vs Σ of the trials' own durations (Tune's ``time_total_s``).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchResult, Column, median, ratio

STEPS = 14
WARMUP_STEPS = 4


def _train_overrides(tmp: Path, steps: int) -> list[str]:
    return [
        "name=bench-overhead",
        f"storage_path={tmp}",
        f"tracking.uri=sqlite:///{tmp / 'mlflow.db'}",
        "tracking.experiment=bench",
        "data.source=default",
        "data.vocab_size=512",
        "data.max_documents=150",
        "data.seq_len=128",
        f"data.cache_dir={tmp / 'cache'}",
        "model.preset=tiny-mor",
        "batch.micro_batch_size=8",
        f"budget.steps={steps}",
        "checkpoint.every_steps=1000",
        "eval.every_steps=1000",
        "eval.batches=1",
        "log_every_steps=1000",
        "report_every_steps=1000",
        "scaling.cpus_per_worker=1",
        "scaling.use_gpu=false",
    ]


def bare_loop(mor_cfg: Any, batch: int, seq_len: int, steps: int, lr: float) -> list[float]:
    """Seconds per optimizer step of a plain PyTorch loop (1 thread, like the 1-CPU worker)."""
    from mor.model import MoRModel
    from trainers.components import param_groups

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = MoRModel(mor_cfg).train()
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=lr, betas=(0.9, 0.95))
        gen = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            x = torch.randint(0, mor_cfg.vocab_size, (batch, seq_len), generator=gen)
            t0 = time.perf_counter()
            out = model(x, labels=x)
            opt.zero_grad(set_to_none=True)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            out.loss.item()
            times.append(time.perf_counter() - t0)
        return times
    finally:
        torch.set_num_threads(threads)


def _trial_times(tune_dir: Path) -> list[float]:
    """time_total_s of each trial, from the last line of its Tune result.json."""
    out = []
    for path in sorted(tune_dir.rglob("result.json")):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if lines:
            t = json.loads(lines[-1]).get("time_total_s")
            if t is not None:
                out.append(float(t))
    return out


def run(quick: bool = False, sweep: bool = True) -> BenchResult:
    import ray
    from mlflow import MlflowClient

    from mor.config import MoRConfig
    from trainers.config import load_train_config
    from trainers.launcher import plan_run, run_training

    t_start = time.perf_counter()
    res = BenchResult(
        5,
        "platform_overhead",
        "Platform overhead: Ray Train + DeepSpeed vs a bare PyTorch loop; Tune sweep",
        [
            Column("what", "measurement"),
            Column("platform_s", "platform (s)", "{:.3f}"),
            Column("bare_s", "reference (s)", "{:.3f}"),
            Column("ratio", "platform ÷ reference", "{:.2f}"),
        ],
    )
    with tempfile.TemporaryDirectory(prefix="mor-bench-") as tmp_s:
        tmp = Path(tmp_s)
        cfg = load_train_config(None, _train_overrides(tmp, STEPS))
        plan = plan_run(cfg)  # data preparation and BPE training, outside both timings
        mor_cfg = MoRConfig.model_validate(plan.model)
        if not ray.is_initialized():
            ray.init(address="local", num_cpus=2, configure_logging=False,
                     include_dashboard=False)  # fmt: skip
        try:
            t0 = time.perf_counter()
            result = run_training(cfg, plan=plan)
            ray_wall = time.perf_counter() - t0
            hist = MlflowClient(result.tracking_uri).get_metric_history(
                result.run_id, "train/step_time_s"
            )
            ray_steps = [m.value for m in sorted(hist, key=lambda m: m.step)][WARMUP_STEPS:]
            t0 = time.perf_counter()
            bare = bare_loop(mor_cfg, cfg.batch.micro_batch_size, cfg.data.seq_len, STEPS,
                             cfg.optim.lr)  # fmt: skip
            bare_wall = time.perf_counter() - t0
            bare_steps = bare[WARMUP_STEPS:]
            res.rows += [
                {
                    "what": "training step (fastest)",
                    "platform_s": min(ray_steps),
                    "bare_s": min(bare_steps),
                    "ratio": ratio(min(ray_steps), min(bare_steps)),
                    "platform_median_s": median(ray_steps),
                    "bare_median_s": median(bare_steps),
                },
                {
                    "what": f"training run end to end ({STEPS} steps)",
                    "platform_s": ray_wall,
                    "bare_s": bare_wall,
                    "ratio": ratio(ray_wall, bare_wall),
                },
            ]
            res.summary["step time Ray+DeepSpeed ÷ bare"] = res.rows[0]["ratio"]
            res.summary["end-to-end Ray+DeepSpeed ÷ bare"] = res.rows[1]["ratio"]
            if sweep:
                _sweep_rows(res, tmp)
        finally:
            ray.shutdown()
    res.notes += [
        f"Model: preset tiny-mor (middle-cycle, N_r=2, expert-choice), micro-batch 8 × 128 "
        f"tokens, {STEPS} steps (the first {WARMUP_STEPS} excluded), 1 Ray "
        "Train worker with 1 CPU (ZeRO-2, fp32) vs a bare loop with 1 thread; embedded "
        "corpus, BPE 512 (prepared once beforehand, outside both timings).",
        "Sweep: 2 trials (vanilla and MoR expert-choice, preset micro, 6 layers, 64-token "
        "sequences, 3e9 training FLOPs each, no evaluation) on a local Ray with 2 CPUs; trials run "
        "concurrently, so wall ÷ Σ trial times < 1 means parallel speed-up.",
    ]
    res.seconds = time.perf_counter() - t_start
    return res


def _sweep_rows(res: BenchResult, tmp: Path) -> None:
    from mor.overrides import validate
    from sweeps.driver import run_sweep, sweep_store
    from sweeps.spec import SweepSpec

    spec = validate(
        SweepSpec,
        {
            "name": "bench-sweep",
            "storage_path": str(tmp / "sweep"),
            "base": {
                "model": {"preset": "micro", "num_layers": 6, "max_seq_len": 64},
                "data": {"source": "default", "vocab_size": 512, "seq_len": 64,
                         "max_documents": 150, "cache_dir": str(tmp / "cache")},
                "batch": {"micro_batch_size": 4},
                "checkpoint": {"every_steps": 1000},
                "eval": {"every_steps": 1000, "batches": 1},
                "log_every_steps": 1000,
            },
            "variants": [
                {"name": "vanilla", "model.sharing": "none", "model.num_recursions": 1},
                {"name": "mor-ec", "model.sharing": "middle_cycle", "model.num_recursions": 2,
                 "model.router": "expert_choice"},
            ],
            "budgets": [3e9],
            "eval": {"enabled": False},
            "tracking": {"experiment": "bench-sweep", "uri": f"sqlite:///{tmp / 'sweep.db'}"},
        },
    )  # fmt: skip
    t0 = time.perf_counter()
    out = run_sweep(spec)
    wall = time.perf_counter() - t0
    trial_times = _trial_times(Path(sweep_store(spec).experiment))
    total = sum(trial_times)
    res.rows.append(
        {
            "what": f"sweep wall vs Σ trial times ({len(trial_times)} trials, "
            f"{len(out.errors)} errors)",
            "platform_s": wall,
            "bare_s": total,
            "ratio": ratio(wall, total),
            "trial_times_s": trial_times,
        }
    )
    res.summary["sweep wall ÷ Σ trial times"] = ratio(wall, total)
