"""Run the CPU benchmark suite: ``python -m benchmarks.run [--quick] [--out DIR] [--only 1,3]``.

Writes ``DIR/results.json`` (machine-readable: one record per benchmark with its rows, headline
ratios and notes) and ``DIR/results.md`` (the same as Markdown tables). Each benchmark compares
its variants side by side in one run and reports ratios; absolute numbers depend on the machine.

1. training step time: MoR vs vanilla vs recursive, against analytic FLOPs (routing overhead)
2. decode throughput: continuous depth-wise batching vs naive batching vs vanilla
3. KV-cache bytes: measured vs analytic, per KV mode
4. FLOPs accounting vs FlopCounterMode, every sharing × router × KV combination
5. platform overhead: Ray Train + DeepSpeed vs bare PyTorch; Tune sweep (skipped by --quick)
6. lm-eval backend loglikelihood throughput at several batch sizes
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchResult, run_meta

SCHEMA_VERSION = 1
TITLES = {
    1: "training step time vs FLOPs",
    2: "decode throughput",
    3: "KV-cache bytes",
    4: "FLOPs vs FlopCounterMode",
    5: "platform overhead",
    6: "lm-eval loglikelihood throughput",
}


def _runner(i: int) -> Callable[[bool], BenchResult]:
    if i == 1:
        from benchmarks.train_step import run as r1

        return lambda quick: r1(quick)
    if i == 2:
        from benchmarks.decode import run_decode

        return lambda quick: run_decode(quick)
    if i == 3:
        from benchmarks.decode import run_kv

        return lambda quick: run_kv(quick)
    if i == 4:
        from benchmarks.flops_check import run as r4

        return lambda quick: r4(quick)
    if i == 5:
        from benchmarks.overhead import run as r5

        return lambda quick: r5(quick)
    from benchmarks.lmeval_bench import run as r6

    return lambda quick: r6(quick)


def parse_only(text: str | None) -> list[int]:
    if not text:
        return sorted(TITLES)
    ids = sorted({int(x) for x in text.replace(" ", "").split(",") if x})
    bad = [i for i in ids if i not in TITLES]
    if bad:
        raise SystemExit(f"--only: unknown benchmark(s) {bad}; choose from {sorted(TITLES)}")
    return ids


def run_suite(
    ids: list[int], quick: bool, out_dir: Path, threads: int | None = None
) -> dict[str, Any]:
    """Run the selected benchmarks; write and return the results document."""
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    results: list[dict[str, Any]] = []
    md: list[str] = []
    for i in ids:
        if quick and i == 5:
            res = BenchResult(5, "platform_overhead", TITLES[5], [], skipped="--quick")
        else:
            print(f"[bench] {i}. {TITLES[i]} ...", flush=True)
            try:
                res = _runner(i)(quick)
            except Exception as exc:  # one broken benchmark must not lose the others
                traceback.print_exc()
                res = BenchResult(i, f"bench{i}", TITLES[i], [], skipped=f"error: {exc}")
            print(f"[bench] {i}. done in {res.seconds:.0f} s", flush=True)
        results.append(res.to_dict())
        md.append(res.to_markdown())
    meta = run_meta(quick) | {"total_seconds": round(time.perf_counter() - t0, 1)}
    head = (
        f"CPU benchmarks ({'quick' if quick else 'full'} run, {meta['created']}; torch "
        f"{meta['torch']}, {meta['torch_threads']} thread(s), {meta['cpu_count']} CPUs; "
        f"{meta['total_seconds']:.0f} s in all)."
    )
    return write_results(out_dir, meta, results, md, head)


def write_results(
    out_dir: Path, meta: dict[str, Any], results: list[dict[str, Any]], md: list[str], head: str
) -> dict[str, Any]:
    """Write results.json and results.md under ``out_dir``; return the JSON document."""
    doc = {"schema_version": SCHEMA_VERSION, "meta": meta, "benchmarks": results}
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "results.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out_dir / "results.md").write_text("\n".join([head, "", *md]))
    return doc


def main(argv: list[str] | None = None) -> int:
    doc = (__doc__ or "").split("\n")[0]
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=doc)
    ap.add_argument("--quick", action="store_true", help="smaller workloads; skips benchmark 5")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--only", default=None, help="comma-separated benchmark numbers, e.g. 3,4")
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: stable side-by-side ratios on a shared machine; 0 = "
        "torch's default)",
    )
    args = ap.parse_args(argv)
    ids = parse_only(args.only)
    doc = run_suite(ids, args.quick, Path(args.out), threads=args.threads or None)
    print(f"[bench] wrote {Path(args.out) / 'results.json'} and results.md "
          f"({doc['meta']['total_seconds']:.0f} s)")  # fmt: skip
    failed = [b["id"] for b in doc["benchmarks"] if (b["skipped"] or "").startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
