"""The paper's model sizes end to end on a CPU, with peak memory against an estimate (issue #16).

    python -m benchmarks.paper_sizes [--small] [--steps N] [--only train,mor360] [--out DIR]

Writes ``DIR/paper_sizes.json`` and ``DIR/paper_sizes.md`` (default DIR: benchmarks/results;
``--small``: ``paper_sizes_small.*``):

1. ``train``: the ``smollm-135m`` preset (30 layers, d 576, seq 2048, the shared SmolLM2
   tokenizer's 49,152-token vocabulary) trained for N optimizer steps (default 2, micro-batch
   1) by ``mor train`` on 2 Ray Train workers with ZeRO-3, exported, then reloaded by
   ``mor eval`` and evaluated on a handful of items. Each worker's peak memory (the kernel's
   peak RSS, ``VmHWM``, and the largest sampled USS) is read from the driver by the pid every
   worker records, and set beside an analytic estimate.
2. ``mor360``: ``smollm-360m-mor3`` (middle-cycle, expert-choice, N_r = 3) runs one
   forward + backward at seq 2048 in a child process; its peak RSS beside the estimate.

``--small`` runs the same pipeline on the ``micro`` shape at seq 64 (a minute): the check that
it works before the real run, which takes several minutes of both cores. CPU timings on a
shared machine are distorted by other work; the memory figures much less so.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.common import BenchResult, Column, run_meta
from mor.config import MoRConfig, build_config

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
CORPUS = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
TOKENIZER = SHARED / "tokenizers" / "smollm2"
MIB = 2**20
EVAL_ITEMS = 8
ZERO3_REDUCE_BUCKET = 500_000_000
"""DeepSpeed's default ZeRO-3 ``reduce_bucket_size`` (elements), which the trainer keeps."""
ZERO3_MAX_LIVE = 1_000_000_000
"""DeepSpeed's default ``stage3_max_live_parameters`` (elements), which the trainer keeps."""


# ------------------------------------------------------------------ analytic estimate
def layer_floats_per_token(cfg: MoRConfig) -> int:
    """Floats one decoder layer keeps for its backward per token (fp32, flash attention).

    Two RMSNorms keep their input and normalised output (4d); q and its rotation (3d: q, the
    rotated half-swap, the result), k likewise and v (4·kv); the attention output and its
    reshaped copy (2d); the SwiGLU keeps gate, silu(gate), up and their product (4f).
    Measured for one smollm-135m layer at seq 2048 with saved-tensor hooks: 102.6 MiB against
    94.5 MiB from this count (rotary tables and the attention's log-sum-exp are left out)."""
    kv = cfg.num_kv_heads * cfg.head_dim
    return 9 * cfg.hidden_size + 4 * kv + 4 * cfg.ffn_size


def layer_applications(cfg: MoRConfig, seq: int) -> float:
    """Layer applications per sequence, in full-sequence equivalents: unique first/last
    layers run every token, recursion r's layers the tokens its router keeps (capacity)."""
    outer = cfg.num_prefix_layers + cfg.num_suffix_layers
    kept = [cfg.capacity_tokens(r, seq) / seq for r in range(cfg.num_recursions)]
    if cfg.router != "expert_choice":
        kept = [1.0] * cfg.num_recursions
    return outer + cfg.recursion_depth * sum(kept)


def estimate(
    cfg: MoRConfig, seq: int, batch: int, workers: int, optimizer: bool, checkpointed: bool
) -> dict:
    """Bytes per worker, fp32: model states (ZeRO-3 partitions parameters, gradients and the
    two Adam moments over the workers: 16 bytes per parameter / workers; without an optimizer
    4 + 4), the activations kept for the backward (``checkpointed``: each layer application's
    input, plus one layer's full set while it is recomputed), and the head's transient
    (logits, their log-softmax and its gradient: 3 · T · V floats live at once). With the
    optimizer (the ZeRO-3 trainer) also DeepSpeed's contiguous gradient bucket: up to
    ``reduce_bucket_size`` (5e8) elements, which holds every gradient of a model this small
    before it is reduce-scattered, and the gathered parameters: up to
    ``stage3_max_live_parameters`` (1e9) elements stay gathered between uses, so a model this
    small can stay whole on every worker (deepspeed/runtime/zero/stage3.py and config.py,
    0.19; upper bounds)."""
    import torch

    from mor.model import MoRModel

    with torch.device("meta"):
        params = MoRModel(cfg).num_parameters()["total"]
    states = (16 * params // workers) if optimizer else 8 * params
    tokens = seq * batch
    apps = layer_applications(cfg, seq)
    if checkpointed:
        acts = tokens * (apps * cfg.hidden_size + layer_floats_per_token(cfg)) * 4
    else:
        acts = tokens * apps * layer_floats_per_token(cfg) * 4
    head = 3 * tokens * cfg.vocab_size * 4
    bucket = 4 * min(ZERO3_REDUCE_BUCKET, params) if optimizer else 0
    gathered = 4 * min(ZERO3_MAX_LIVE, params) if optimizer else 0
    return {
        "params": params,
        "states_mib": states / MIB,
        "activations_mib": acts / MIB,
        "head_mib": head / MIB,
        "bucket_mib": bucket / MIB,
        "gathered_mib": gathered / MIB,
        "total_mib": (states + acts + head + bucket + gathered) / MIB,
    }


# ------------------------------------------------------------------ memory of other processes
def _status_kib(pid: int, key: str) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


class WorkerMemory:
    """Samples the Ray Train workers of a run (their ``worker_rank*.pid`` files) every
    ``period`` s: the first RSS seen (the baseline: Ray and torch loaded, no model yet), the
    kernel's peak RSS (``VmHWM``, exact) and the largest USS sampled."""

    def __init__(self, run_dir: Path, period: float = 1.0) -> None:
        self.run_dir, self.period = run_dir, period
        self.stats: dict[int, dict[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        import psutil

        while not self._stop.wait(self.period):
            for f in self.run_dir.glob("worker_rank*.pid"):
                rank = int(f.stem.removeprefix("worker_rank"))
                try:
                    pid = int(f.read_text())
                    uss = psutil.Process(pid).memory_full_info().uss / MIB
                except (OSError, ValueError, psutil.Error):
                    continue
                hwm = _status_kib(pid, "VmHWM")
                rss = _status_kib(pid, "VmRSS")
                if hwm is None or rss is None:  # the worker is exiting (or gone)
                    continue
                s = self.stats.setdefault(rank, {"pid": pid, "baseline_rss_mib": rss / 1024})
                if s["pid"] != pid:  # a restarted worker: start over
                    s = self.stats[rank] = {"pid": pid, "baseline_rss_mib": rss / 1024}
                s["peak_rss_mib"] = hwm / 1024
                s["peak_uss_mib"] = max(s.get("peak_uss_mib", 0.0), uss)
            if self.stats:  # kept on disk too: a later failure must not lose the figures
                (self.run_dir.parent.parent / "memory.json").write_text(json.dumps(self.stats))


# ------------------------------------------------------------------ 1. train, export, eval
@contextmanager
def local_ray(cpus: int = 2, tries: int = 4) -> Iterator[str]:
    """A Ray cluster of this process for ``mor train`` to join (its GCS address). Ray gives a
    starting node 30 s to register, which a loaded shared machine can miss: retried."""
    import ray

    for attempt in range(tries):
        try:
            ctx = ray.init(
                address="local", num_cpus=cpus, include_dashboard=False, configure_logging=False
            )
            break
        except Exception as exc:  # Ray raises a bare Exception on the start-up timeout
            ray.shutdown()
            if attempt == tries - 1:
                raise
            print(f"[paper_sizes] Ray did not start ({str(exc)[:80]}); retrying", flush=True)
            time.sleep(5)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


def _mor(args: list[str], log: Path, timeout: float) -> float:
    """Run the ``mor`` CLI the way a user types it; seconds taken (raises on failure)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
        )  # fmt: skip
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-15:]
        raise RuntimeError(f"mor {args[0]} failed ({proc.returncode}):\n" + "\n".join(tail))
    return time.perf_counter() - t0


def train_overrides(work: Path, small: bool, steps: int, ac: bool, address: str) -> list[str]:
    seq = 64 if small else 2048
    model = (
        ["model.preset=micro", "model.vocab_size=49152", "model.max_seq_len=64"]
        if small
        else ["model.preset=smollm-135m"]
    )
    return [
        "name=paper-135m",
        f"storage_path={work}",
        f"data.source={CORPUS}",
        f"data.tokenizer={TOKENIZER}",
        f"data.cache_dir={work / 'data'}",
        f"data.seq_len={seq}",
        *model,
        "batch.micro_batch_size=1",
        f"budget.steps={steps}",
        "deepspeed.zero_stage=3",
        "deepspeed.precision=fp32",
        "scaling.num_workers=2",
        "scaling.cpus_per_worker=1",
        "eval.every_steps=1000",
        "eval.batches=1",
        "checkpoint.every_steps=1000",
        "log_every_steps=1",
        f"activation_checkpointing={str(ac).lower()}",
        f"address={address}",
    ]


def run_train(work: Path, small: bool, steps: int, ac: bool, reuse: bool) -> BenchResult:
    """``reuse``: the run already finished in ``work`` (its logs, ``memory.json`` and
    ``times.json``): only rebuild its record."""
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    if not reuse:
        with local_ray() as address, WorkerMemory(work / "runs" / "paper-135m"):
            over = train_overrides(work, small, steps, ac, address)
            train_s = _mor(["train", *over], work / "train.log", timeout=3600)
        export = work / "runs" / "paper-135m" / "export"
        eval_args = ["eval", str(export), "--tasks", "mor_heldout_mc", "--limit", str(EVAL_ITEMS)]
        eval_s = _mor([*eval_args, "--batch-size", "4", "--json"], work / "eval.log", 1800)
        (work / "times.json").write_text(json.dumps({"train_s": train_s, "eval_s": eval_s}))
    export = work / "runs" / "paper-135m" / "export"
    times = json.loads((work / "times.json").read_text()) if (work / "times.json").exists() else {}
    stats = {int(k): v for k, v in json.loads((work / "memory.json").read_text()).items()}
    model = json.loads((export / "config.json").read_text())["model"]
    cfg = build_config(None, **model)
    est = estimate(cfg, 64 if small else 2048, 1, 2, optimizer=True, checkpointed=ac)
    res = BenchResult(
        1,
        "train_135m",
        f"{'micro (--small)' if small else 'smollm-135m'}: {steps} steps, 2 Ray Train workers, "
        f"ZeRO-3, seq {cfg.max_seq_len}, activation checkpointing {'on' if ac else 'off'} → "
        "export → mor eval",
        [
            Column("rank", "worker"),
            Column("baseline_rss_mib", "RSS before the model (MiB)", "{:.0f}"),
            Column("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
            Column("peak_uss_mib", "peak USS, sampled (MiB)", "{:.0f}"),
            Column("growth_mib", "peak RSS − baseline (MiB)", "{:.0f}"),
            Column("estimate_mib", "estimate (MiB)", "{:.0f}"),
        ],
    )
    for rank, s in sorted(stats.items()):
        growth = s.get("peak_rss_mib", float("nan")) - s["baseline_rss_mib"]
        res.rows.append({"rank": rank, **s, "growth_mib": growth, "estimate_mib": est["total_mib"]})
    res.summary = {**times, "params": est["params"]}
    res.notes += _train_notes(work, est, ac)
    res.seconds = sum(times.values()) if times else time.perf_counter() - t0
    return res


def _train_notes(work: Path, est: dict, ac: bool) -> list[str]:
    log = (work / "train.log").read_text().splitlines()
    losses = [ln.split("[mor] ", 1)[-1] for ln in log if "train_loss" in ln or "[mor]   " in ln]
    tags = [ln.split("[mor] ", 1)[-1] for ln in log if "optimizer AdamW" in ln]
    kept = "each layer's input plus one layer recomputed" if ac else "every layer's"
    ev = (work / "eval.log").read_text()
    report = json.loads(ev[ev.index("\n{") :])["report"] if "\n{" in ev else {}
    return [
        f"Estimate (per worker, fp32): model states {est['states_mib']:.0f} MiB "
        f"(16 B × {est['params']:,} parameters / 2 workers) + activations "
        f"{est['activations_mib']:.0f} MiB ({kept}) + head transient "
        f"{est['head_mib']:.0f} MiB + ZeRO-3 gradient bucket {est['bucket_mib']:.0f} MiB + "
        f"gathered parameters {est['gathered_mib']:.0f} MiB (the last two: upper bounds from "
        "DeepSpeed's defaults).",
        *(f"`{t}`" for t in tags[:1]),
        *(f"`{line.strip()}`" for line in losses),
        f"mor eval of the export on {EVAL_ITEMS} items of mor_heldout_mc: "
        + json.dumps(_eval_headline(report)),
    ]


def _eval_headline(report: dict) -> Any:
    keys = ("label", "average", "nll", "flops_per_token")
    return [{k: p.get(k) for k in keys} for p in report.get("points") or []]


# ------------------------------------------------------------------ 2. one step at 360M, N_r=3
def forward_backward(preset: str, seq: int, overrides: dict[str, Any], ac: bool) -> dict[str, Any]:
    """In this (child) process: one forward + backward of ``preset`` on ``seq`` tokens of the
    corpus encoded by the shared SmolLM2 tokenizer (``ac``: the trainer's activation
    checkpointing, ``trainers.components.checkpoint_layers``); peak RSS from the kernel."""
    import torch
    from tokenizers import Tokenizer

    from mor.model import MoRModel

    base = _status_kib(os.getpid(), "VmRSS") or 0
    tok = Tokenizer.from_file(str(TOKENIZER / "tokenizer.json"))
    ids = tok.encode(CORPUS.read_text()[: seq * 8]).ids[:seq]
    cfg = build_config(preset, max_seq_len=seq, **overrides)
    torch.manual_seed(0)
    model = MoRModel(cfg).train()
    if ac:
        from trainers.components import checkpoint_layers

        checkpoint_layers(model)
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    out = model(x, labels=x)
    fwd = time.perf_counter() - t0
    out.loss.backward()
    step = time.perf_counter() - t0
    grads = sum(p.grad is not None for p in model.parameters())
    return {
        "preset": preset,
        "seq": seq,
        "loss": float(out.loss),
        "active_fraction": out.stats.active_fraction if out.stats else None,
        "params_with_grad": grads,
        "params": len(list(model.parameters())),
        "forward_s": fwd,
        "step_s": step,
        "baseline_rss_mib": base / 1024,
        "peak_rss_mib": (_status_kib(os.getpid(), "VmHWM") or 0) / 1024,
    }


def run_mor360(small: bool, ac: bool) -> BenchResult:
    t0 = time.perf_counter()
    preset, seq = ("micro", 64) if small else ("smollm-360m-mor3", 2048)
    over = (
        dict(vocab_size=49152, sharing="middle_cycle", num_recursions=3, router="expert_choice",
             num_layers=5)
        if small else {}
    )  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    arg = json.dumps({"preset": preset, "seq": seq, "overrides": over, "ac": ac})
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.paper_sizes", "--child", arg],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=3600,
    )  # fmt: skip
    if proc.returncode != 0:
        raise RuntimeError(f"forward+backward failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    cfg = build_config(preset, max_seq_len=seq, **over)
    est = estimate(cfg, seq, 1, 1, optimizer=False, checkpointed=ac)
    row["growth_mib"] = row["peak_rss_mib"] - row["baseline_rss_mib"]
    row["estimate_mib"] = est["total_mib"]
    res = BenchResult(
        2,
        "fwd_bwd_360m_mor3",
        f"{preset}: one forward + backward at seq {seq} (one process, fp32, activation "
        f"checkpointing {'on' if ac else 'off'})",
        [
            Column("preset", "model"),
            Column("loss", "loss", "{:.3f}"),
            Column("step_s", "forward + backward (s)", "{:.0f}"),
            Column("baseline_rss_mib", "RSS before the model (MiB)", "{:.0f}"),
            Column("peak_rss_mib", "peak RSS (MiB)", "{:.0f}"),
            Column("growth_mib", "peak RSS − baseline (MiB)", "{:.0f}"),
            Column("estimate_mib", "estimate (MiB)", "{:.0f}"),
        ],
        rows=[row],
    )
    res.notes += [
        f"Estimate: parameters + gradients {est['states_mib']:.0f} MiB (8 B × "
        f"{est['params']:,}) + activations {est['activations_mib']:.0f} MiB "
        f"({layer_applications(cfg, seq):.2f} full-sequence layer applications: the "
        "recursions run the tokens their capacity keeps) + head transient "
        f"{est['head_mib']:.0f} MiB.",
        f"Active fraction per recursion {row['active_fraction']}; "
        f"{row['params_with_grad']}/{row['params']} parameter tensors got a gradient.",
    ]
    res.seconds = time.perf_counter() - t0
    return res


# ------------------------------------------------------------------ driver
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--small", action="store_true", help="micro shape, seq 64: a quick check")
    ap.add_argument("--steps", type=int, default=2, help="optimizer steps of the 135M run")
    ap.add_argument("--only", default="train,mor360", help="train, mor360 or both")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument(
        "--no-checkpointing",
        action="store_true",
        help="without activation checkpointing (several GiB more per process at seq 2048)",
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="train: rebuild the record of a run already finished in --work (no rerun)",
    )
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        row = forward_backward(
            spec["preset"], spec["seq"], spec["overrides"], spec.get("ac", False)
        )
        print(json.dumps(row))
        return 0
    import tempfile

    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    ac = not args.no_checkpointing
    results = []
    with tempfile.TemporaryDirectory(prefix="mor-paper-sizes-") as tmp:
        work = Path(args.work or tmp)
        if "train" in parts:
            results.append(run_train(work / "train", args.small, args.steps, ac, args.reuse))
        if "mor360" in parts:
            results.append(run_mor360(args.small, ac))
    name = "paper_sizes_small" if args.small else "paper_sizes"
    write(Path(args.out), name, results, args.small)
    print(f"[paper_sizes] wrote {args.out}/{name}.json and .md")
    return 0


def write(out: Path, name: str, results: list[BenchResult], small: bool) -> None:
    """JSON + Markdown; a part not rerun (``--only``) keeps its earlier record."""
    meta = run_meta(small)
    path = out / f"{name}.json"
    fresh = [r.to_dict() for r in results]
    kept = []
    if path.exists():
        rerun = {r["key"] for r in fresh}
        kept = [b for b in json.loads(path.read_text())["benchmarks"] if b["key"] not in rerun]
    docs = sorted(kept + fresh, key=lambda b: b["id"])
    doc = {"schema_version": 1, "meta": meta, "benchmarks": docs}
    head = (
        f"# The paper's sizes on a CPU ({'--small' if small else 'full'} run, "
        f"{meta['created']}; torch {meta['torch']}, {meta['cpu_count']} CPUs shared with "
        "other work, timings distorted by it)"
    )
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    md = [head, ""]
    for b in docs:
        md.append(_markdown(b))
    (out / f"{name}.md").write_text("\n".join(md))


def _markdown(b: dict[str, Any]) -> str:
    """A results record (``BenchResult.to_dict``) as its Markdown table."""
    cols = [Column(k, h) for k, h in zip(b["columns"], b["headers"], strict=True)]
    res = BenchResult(b["id"], b["key"], b["title"], cols, b["rows"], b["summary"], b["notes"])
    res.seconds = b["seconds"]
    for c in res.columns:
        whole = c.key.endswith(("_mib", "_s"))
        c.fmt = "{:.3f}" if c.key == "loss" else "{:.0f}" if whole else "{}"
    return res.to_markdown()


if __name__ == "__main__":
    sys.exit(main())
