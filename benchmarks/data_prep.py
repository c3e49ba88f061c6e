"""Data preparation at scale (issue #17): throughput, memory and disk of the streamed stage.

    python -m benchmarks.data_prep [--scales 1,8,64] [--base-tokens 40e6] [--work DIR] [--out DIR]

Builds synthetic corpora of 1×, 8×, 64× a base size by repeating the shared English corpora
(../shared/data/corpus) into parquet shards, then prepares each with the SmolLM2 tokenizer
(49,152 ids, as in the paper) on a local Ray cluster, measuring in the same run:

- tokens/s of the whole stage, and peak RSS of the driver and of each Ray worker (sampled
  every 0.2 s with psutil), and disk bytes per token of the shards; each measurement runs in a
  fresh process (``--child``), so the driver's figure is the stage's alone, not what building
  the corpora or another measurement left in this process's allocator;
- at 1×, the same stage on a 1-CPU cluster (the 2-CPU/1-CPU throughput ratio), the raw
  ``Tokenizer.encode_batch`` rate on one core on the same text (the per-core ceiling), and
  ``datasets.map(batched=True, num_proc=2)`` on the same files.

Writes ``DIR/data_prep.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2" / "tokenizer.json"
CHARS_PER_TOKEN = 3.7  # SmolLM2 on the shared corpora: about 3.8, so 1x is just over 40M tokens
FILE_CHARS = 8 << 20  # one parquet file (one unit) of the synthetic corpus


class PeakRSS:
    """Peak resident memory of this process and of every Ray worker, sampled in a thread;
    ``driver_uss``: the driver's own pages (RSS less what it shares, e.g. Ray's object store
    and shared libraries)."""

    def __init__(self) -> None:
        self.driver = 0
        self.driver_uss = 0
        self.workers: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            full = me.memory_full_info()
            self.driver = max(self.driver, full.rss)
            self.driver_uss = max(self.driver_uss, full.uss)
            # This process's descendants only (its Ray's raylet spawns the workers): another
            # Ray cluster on the machine must not count.
            for p in me.children(recursive=True):
                try:
                    cmd = " ".join(p.cmdline())
                    if "ray::" in cmd or "default_worker.py" in cmd or "python" in p.name():
                        self.workers[p.pid] = max(self.workers.get(p.pid, 0), p.memory_info().rss)
                except (psutil.Error, OSError):
                    continue
            time.sleep(0.2)

    def __enter__(self) -> PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def base_documents() -> list[str]:
    from trainers.data import DataConfig, load_documents

    return load_documents(DataConfig(source=str(SHARED / "corpus")))


def build_corpus(folder: Path, chars: float, docs: list[str]) -> int:
    """Parquet files of ~64 MB of text repeating ``docs`` up to ``chars``; returns files."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True, exist_ok=True)
    written, index, rows = 0, 0, []
    size = 0
    while written < chars:
        for doc in docs:
            rows.append(doc)
            size += len(doc)
            written += len(doc)
            if size >= FILE_CHARS or written >= chars:
                pq.write_table(pa.table({"text": rows}), folder / f"part-{index:05d}.parquet")
                index, rows, size = index + 1, [], 0
            if written >= chars:
                break
    return index


def prepare(source: Path, out: Path, cpus: int) -> dict[str, Any]:
    """The stage on a fresh local Ray cluster of ``cpus`` CPUs (start-up not timed)."""
    import ray

    from trainers.data import DataConfig, prepare_data

    shutil.rmtree(out, ignore_errors=True)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        cfg = DataConfig(source=str(source), tokenizer=str(SMOLLM2), cache_dir=str(out.parent))
        with PeakRSS() as rss:
            start = time.perf_counter()
            data = prepare_data(cfg, out=out)
            seconds = time.perf_counter() - start
    finally:
        ray.shutdown()
    tokens = data.num_train_tokens + data.num_val_tokens
    disk = sum(f.stat().st_size for f in out.rglob("*.npy"))
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "driver_peak_mb": rss.driver / 2**20,
        "driver_uss_peak_mb": rss.driver_uss / 2**20,
        "worker_peak_mb": max(rss.workers.values(), default=0) / 2**20,
        "bytes_per_token": disk / tokens,
        "shards": len(data.shards["train"]) + len(data.shards["val"]),
    }


def raw_encode_rate(docs: list[str], chars: float) -> float:
    """Tokens/s of ``encode_batch_fast`` on one core over the first ``chars`` of ``docs``."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(SMOLLM2))
    sample, size = [], 0
    for doc in docs:
        sample.append(doc)
        size += len(doc)
        if size >= chars:
            break
    start = time.perf_counter()
    n = 0
    for i in range(0, len(sample), 512):
        n += sum(len(e.ids) for e in tok.encode_batch_fast(sample[i : i + 512]))
    return n / (time.perf_counter() - start)


def datasets_map(source: Path, work: Path) -> dict[str, Any]:
    """The same files through ``datasets.map(batched=True, num_proc=2)``."""
    import datasets
    from tokenizers import Tokenizer

    cache = work / "hf-cache"
    shutil.rmtree(cache, ignore_errors=True)
    files = sorted(str(f) for f in source.glob("*.parquet"))
    with PeakRSS() as rss:
        start = time.perf_counter()
        ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=str(cache))
        tok = Tokenizer.from_file(str(SMOLLM2))

        def encode(batch: dict[str, list[str]]) -> dict[str, list[list[int]]]:
            return {"ids": [e.ids for e in tok.encode_batch_fast(batch["text"])]}

        out = ds.map(encode, batched=True, num_proc=2, remove_columns=["text"])
        tokens = sum(len(x) for x in out.with_format("numpy")["ids"])
        seconds = time.perf_counter() - start
    disk = sum(f.stat().st_size for f in cache.rglob("*.arrow"))
    return {
        "tokens": int(tokens),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "driver_peak_mb": rss.driver / 2**20,
        "driver_uss_peak_mb": rss.driver_uss / 2**20,
        "worker_peak_mb": max(rss.workers.values(), default=0) / 2**20,
        "bytes_per_token": disk / tokens,
    }


def in_child(kind: str, **kwargs: Any) -> dict[str, Any]:
    """Run one measurement (``prepare`` or ``datasets_map``) in a fresh Python process."""
    args = [sys.executable, "-m", "benchmarks.data_prep", "--child", kind, json.dumps(kwargs)]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{kind} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def child(kind: str, kwargs: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process, as in the stage
    a = json.loads(kwargs)
    if kind == "prepare":
        row = prepare(Path(a["source"]), Path(a["out"]), a["cpus"])
    else:
        row = datasets_map(Path(a["source"]), Path(a["work"]))
    print(json.dumps(row), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scales", default="1,8,64")
    ap.add_argument("--base-tokens", type=float, default=40e6)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mor-data-bench"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--skip-datasets", action="store_true")
    ap.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(*args.child)
    docs = base_documents()
    rows: list[dict[str, Any]] = []
    for scale in [int(s) for s in args.scales.split(",")]:
        source = args.work / f"corpus-{scale}x"
        if not source.is_dir():
            build_corpus(source, scale * args.base_tokens * CHARS_PER_TOKEN, docs)
        for cpus in (2, 1) if scale == 1 else (2,):
            out = str(args.work / f"out-{scale}x-{cpus}cpu")
            row = in_child("prepare", source=str(source), out=out, cpus=cpus)
            rows.append({"scale": f"{scale}x", "method": f"mor data prepare, {cpus} CPU", **row})
            print(json.dumps(rows[-1]), flush=True)
        if scale == 1 and not args.skip_datasets:
            row = in_child("datasets_map", source=str(source), work=str(args.work))
            rows.append({"scale": "1x", "method": "datasets.map num_proc=2", **row})
            print(json.dumps(rows[-1]), flush=True)
    raw = raw_encode_rate(docs * 4, 20e6)
    write(args.out, rows, raw)


def write(out: Path, rows: list[dict[str, Any]], raw: float) -> None:
    two = [r for r in rows if r["method"].endswith("2 CPU")]
    one = next((r for r in rows if r["method"].endswith("1 CPU")), None)
    summary = {
        "raw_encode_tokens_per_s_one_core": raw,
        "speedup_2cpu_vs_1cpu": two[0]["tokens_per_s"] / one["tokens_per_s"] if one else None,
        "per_core_vs_raw": one["tokens_per_s"] / raw if one else None,
        "driver_peak_ratio_max_vs_1x": two[-1]["driver_peak_mb"] / two[0]["driver_peak_mb"],
        "driver_uss_ratio_max_vs_1x": two[-1]["driver_uss_peak_mb"] / two[0]["driver_uss_peak_mb"],
        "worker_peak_ratio_max_vs_1x": two[-1]["worker_peak_mb"] / two[0]["worker_peak_mb"],
    }
    record = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "rows": rows,
        "summary": summary,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "data_prep.json").write_text(json.dumps(record, indent=1))
    lines = [
        f"Data preparation, {record['date']}, {record['machine']}; SmolLM2 tokenizer.",
        "",
        "| scale | method | tokens | s | tokens/s | driver peak MB (RSS / own) | worker peak MB "
        "| bytes/token |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['scale']} | {r['method']} | {r['tokens']:,} | {r['seconds']:.0f} | "
            f"{r['tokens_per_s']:,.0f} | {r['driver_peak_mb']:.0f} / "
            f"{r['driver_uss_peak_mb']:.0f} | {r['worker_peak_mb']:.0f} | "
            f"{r['bytes_per_token']:.2f} |"
        )
    lines += ["", "Summary: " + "; ".join(f"{k} = {v:.3g}" for k, v in summary.items() if v), ""]
    (out / "data_prep.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
