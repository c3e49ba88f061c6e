"""Where a ZeRO-3 worker's memory goes (issue #16): the 135M run's peak RSS, phase by phase.

    python -m benchmarks.zero3_memory [--small] [--out DIR]

``benchmarks.paper_sizes`` measured each of the two Ray Train workers of the ``smollm-135m``
ZeRO-3 run at ~5.8 GiB peak RSS against an analytic estimate of 3.4 GiB. This benchmark
takes the same engine (``trainers.components.build_engine``: the trainer's model, activation
checkpointing, AdamW and DeepSpeed config; seq 2048, micro-batch 1, fp32) on 2 processes
joined by gloo, without Ray, and runs two optimizer steps. Each phase (importing DeepSpeed,
the engine's set-up, then forward, backward and optimizer step of each step) resets the
kernel's peak-RSS counter (``/proc/self/clear_refs``) before it and reads it after, so every
phase has its own peak and the memory it leaves behind.

It runs twice: with glibc's default allocator settings, and with ``MALLOC_MMAP_THRESHOLD_``
fixed at 64 KiB, so every block of 64 KiB or more is its own mapping, returned to the kernel
when freed. glibc otherwise raises that threshold to the size of the largest block freed
(up to 32 MiB), after which tensors of that size come from its heap, where freed memory stays
counted in RSS. The difference between the two runs is memory the allocator kept, not memory
the training held. Writes ``DIR/zero3_memory.{json,md}`` (``--small``:
``zero3_memory_small.*``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, Column, run_meta
from benchmarks.paper_sizes import MIB, estimate

ROOT = Path(__file__).resolve().parents[1]
ALLOCATORS = {"glibc default": {}, "mmap threshold 64 KiB": {"MALLOC_MMAP_THRESHOLD_": "65536"}}
"""The allocator settings compared: environment variables of the two rank processes."""
WORLD = 2


def _kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


class Phases:
    """Peak and remaining RSS of each phase in this process, in MiB."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Any) -> Any:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        start, t0 = _kib("VmRSS"), time.perf_counter()
        out = fn()
        self.rows.append({
            "phase": name,
            "rss_before_mib": start / 1024,
            "peak_mib": _kib("VmHWM") / 1024,
            "rss_after_mib": _kib("VmRSS") / 1024,
            "seconds": time.perf_counter() - t0,
        })  # fmt: skip
        return out


def overrides(small: bool) -> list[str]:
    """The 135M run of ``benchmarks.paper_sizes`` (``train_overrides``), minus data and Ray."""
    model = (
        ["model.preset=micro", "model.vocab_size=49152", "model.max_seq_len=64"]
        if small
        else ["model.preset=smollm-135m"]
    )
    return [
        *model,
        f"data.seq_len={64 if small else 2048}",
        "batch.micro_batch_size=1",
        "budget.steps=2",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=fp32",
        "activation_checkpointing=true",
    ]


def rank_main(small: bool) -> None:
    """One rank (``RANK``, ``WORLD_SIZE``, ``MASTER_*`` set by the parent): engine, two
    steps, its phases as the last line of stdout."""
    import torch
    import torch.distributed as dist

    from trainers.components import build_engine, training_forward
    from trainers.config import load_train_config

    torch.set_num_threads(1)  # the Ray Train worker's 1 CPU
    dist.init_process_group("gloo")
    cfg = load_train_config(None, overrides(small))
    mor_cfg = cfg.mor_config(vocab_size=49152)
    phases = Phases()
    base = _kib("VmRSS") / 1024
    phases.run("import deepspeed", lambda: importlib.import_module("deepspeed"))
    engine = phases.run("engine (model, ZeRO-3 partitions)", lambda: build_engine(
        cfg, mor_cfg, 2, torch.device("cpu")))  # fmt: skip
    gen = torch.Generator().manual_seed(dist.get_rank())
    for step in (1, 2):
        x = torch.randint(0, 49152, (1, cfg.data.seq_len), generator=gen)
        out = phases.run(f"step {step}: forward", lambda x=x: training_forward(engine, x))
        phases.run(f"step {step}: backward", lambda out=out: engine.backward(out.loss))
        phases.run(f"step {step}: optimizer step", engine.step)
        del out
    print(json.dumps({"rank": dist.get_rank(), "baseline_mib": base, "phases": phases.rows}))
    dist.destroy_process_group()


def run_ranks(small: bool, allocator_env: dict[str, str]) -> list[dict[str, Any]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank in range(WORLD):
        env = dict(os.environ, **allocator_env, PYTHONPATH=str(ROOT), RANK=str(rank),
                   WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1")  # fmt: skip
        cmd = [sys.executable, "-m", "benchmarks.zero3_memory", "--rank"]
        cmd += ["--small"] if small else []
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))  # fmt: skip
    results = []
    for p in procs:
        out, err = p.communicate(timeout=3600)
        if p.returncode != 0:
            raise RuntimeError(f"rank failed ({p.returncode}):\n{err[-3000:]}")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return sorted(results, key=lambda r: r["rank"])


def measure(small: bool) -> BenchResult:
    t0 = time.perf_counter()
    rows = []
    for name, env in ALLOCATORS.items():
        for r in run_ranks(small, env):
            for ph in r["phases"]:
                rows.append({"allocator": name, "rank": r["rank"], **ph,
                             "peak_growth_mib": ph["peak_mib"] - r["baseline_mib"]})  # fmt: skip
    from trainers.config import load_train_config

    cfg = load_train_config(None, overrides(small)).mor_config(vocab_size=49152)
    est = estimate(cfg, 64 if small else 2048, 1, WORLD, optimizer=True, checkpointed=True)
    res = BenchResult(
        1,
        "zero3_phases",
        f"{'micro (seq 64)' if small else 'smollm-135m (seq 2048)'}: ZeRO-3 on {WORLD} gloo "
        "processes, fp32, activation checkpointing, micro-batch 1; RSS per phase",
        [
            Column("allocator", "allocator"),
            Column("rank", "rank"),
            Column("phase", "phase"),
            Column("rss_before_mib", "RSS before (MiB)", "{:.0f}"),
            Column("peak_mib", "peak RSS in the phase (MiB)", "{:.0f}"),
            Column("rss_after_mib", "RSS after (MiB)", "{:.0f}"),
            Column("peak_growth_mib", "peak − process baseline (MiB)", "{:.0f}"),
            Column("seconds", "s", "{:.1f}"),
        ],
        rows=rows,
    )
    for name in ALLOCATORS:
        peak = max(r["peak_growth_mib"] for r in rows if r["allocator"] == name)
        res.summary[f"peak_growth_mib[{name}]"] = peak
    res.summary["estimate_mib"] = est["total_mib"]
    res.notes.append(
        f"Estimate per worker ({est['params']:,} parameters): model states "
        f"{est['states_mib']:.0f} MiB + activations {est['activations_mib']:.0f} + head "
        f"transient {est['head_mib']:.0f} + ZeRO-3 bucket {est['bucket_mib']:.0f} + gathered "
        f"parameters {est['gathered_mib']:.0f} = {est['total_mib']:.0f} MiB "
        f"(benchmarks.paper_sizes.estimate); 1 MiB = {MIB} bytes."
    )
    res.seconds = time.perf_counter() - t0
    return res


def write(out: Path, name: str, res: BenchResult, small: bool) -> None:
    meta = run_meta(small)
    doc = {"schema_version": 1, "meta": meta, "benchmarks": [res.to_dict()]}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    head = (
        f"# A ZeRO-3 worker's memory, phase by phase ({'--small' if small else 'full'} run, "
        f"{meta['created']}; torch {meta['torch']}, {meta['cpu_count']} CPUs)"
    )
    (out / f"{name}.md").write_text(head + "\n\n" + res.to_markdown())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--small", action="store_true", help="micro shape, seq 64: a quick check")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--rank", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rank:
        rank_main(args.small)
        return 0
    name = "zero3_memory_small" if args.small else "zero3_memory"
    write(Path(args.out), name, measure(args.small), args.small)
    print(f"[zero3_memory] wrote {args.out}/{name}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
