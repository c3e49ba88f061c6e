"""The tokenization stage of data preparation: each unit of a source becomes token shards.

``run_units`` skips units already finished (their ``units/NNNNNN.json`` marker exists), then
runs the rest in this process (one unit, one worker, or when called from inside a Ray task or
actor, whose CPUs the stage must not wait for) or as a Ray Data pipeline, one task per unit
and one CPU per task, over the cluster. ``tokenize_unit`` streams a unit's documents, splits
them by document hash, encodes them in bounded batches and writes shards of exactly
``shard_tokens`` (the unit's last one shorter), each by atomic rename, never rewriting one
that exists. Shards and markers depend only on the unit and the job, so the result is the
same however the units are scheduled.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from core.storage import Location
from mor.corpus import _is_val
from mor.overrides import ConfigError
from trainers.sources import SkipCounts, Unit, documents

__all__ = ["ShardWriter", "run_units", "tokenize_unit"]

SPLITS = ("train", "val")


class ShardWriter:
    """Fills fixed-size token shards of one split of one unit; holds one shard in memory."""

    def __init__(self, out: Location, split: str, unit: int, size: int, dtype: np.dtype) -> None:
        self.out, self.split, self.unit = out, split, unit
        self.buf = np.empty(size, dtype=dtype)  # untouched pages cost nothing
        self.n = 0
        self.shards: list[dict[str, Any]] = []

    def add(self, ids: np.ndarray) -> None:
        while ids.size:
            take = min(ids.size, self.buf.size - self.n)
            self.buf[self.n : self.n + take] = ids[:take]
            self.n += take
            ids = ids[take:]
            if self.n == self.buf.size:
                self.flush()

    def flush(self) -> None:
        if self.n == 0:
            return
        name = f"{self.split}/{self.unit:06d}-{len(self.shards):04d}.npy"
        target = self.out.child(name)
        if not target.is_file():  # a finished shard is never rewritten (same bytes anyway)
            tokens = self.buf[: self.n]
            target.write(lambda f: np.save(f, tokens))
        self.shards.append({"file": name, "tokens": int(self.n)})
        self.n = 0


def _encode(tok: Tokenizer, docs: list[str], eos: np.ndarray, vocab: int) -> np.ndarray:
    """Token ids of ``docs``, each followed by end-of-text, as one array."""
    parts: list[np.ndarray] = []
    # No BOS/EOS post-processing: documents get exactly one separator, ours.
    for enc in tok.encode_batch_fast(docs, add_special_tokens=False):
        parts.append(np.asarray(enc.ids, dtype=np.uint32))
        parts.append(eos)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    if ids.size and int(ids.max()) >= vocab:
        raise ConfigError(f"tokenizer: produced id {int(ids.max())} >= its vocab size {vocab}")
    return ids


_TOKENIZERS: dict[str, Tokenizer] = {}


def _tokenizer(where: str) -> Tokenizer:
    """The tokenizer.json at ``where`` (in the output folder: tasks read it from storage, not
    from their arguments, which the driver would hold once per task), loaded once per process:
    a Ray worker running many units keeps its BPE word cache warm (a fresh tokenizer per unit
    encoded at half the rate: benchmarks/results/data_prep*.md)."""
    if where not in _TOKENIZERS:
        _TOKENIZERS.clear()
        _TOKENIZERS[where] = Tokenizer.from_str(Location.parse(where).read_text())
    return _TOKENIZERS[where]


def tokenize_unit(job: dict[str, Any], index: int, unit: dict[str, Any]) -> dict[str, Any]:
    """Tokenize unit ``index`` into shards under ``job["out"]``; write and return its marker."""
    out, u = Location.parse(job["out"]), Unit(**unit)
    tok = _tokenizer(job["tokenizer"])
    eos = np.array([job["eos_id"]], dtype=np.uint32)
    writers = {
        s: ShardWriter(out, s, index, job["shard_tokens"], np.dtype(job["dtype"])) for s in SPLITS
    }
    skips = SkipCounts()
    counts = dict.fromkeys(SPLITS, 0)
    batch: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = 0
    docs = documents(
        u,
        job["text_field"],
        job["decode_errors"],
        job["max_document_chars"],
        skips,
        job["max_documents"],
    )
    for doc in docs:
        split = "val" if _is_val(doc, job["val_fraction"]) else "train"
        batch[split].append(doc)
        counts[split] += 1
        chars += len(doc)
        if chars >= job["encode_batch_chars"]:
            for s in SPLITS:
                writers[s].add(_encode(tok, batch[s], eos, job["vocab_size"]))
            batch, chars = {s: [] for s in SPLITS}, 0
    for s in SPLITS:
        writers[s].add(_encode(tok, batch[s], eos, job["vocab_size"]))
        writers[s].flush()
    marker = {
        "index": index,
        "unit": unit,
        "documents": counts,
        "shards": {s: writers[s].shards for s in SPLITS},
        "skipped": skips.to_dict(),
        "columns": skips.columns,
    }
    out.child("units", f"{index:06d}.json").write_text(json.dumps(marker))  # last: unit done
    return marker


def _finished(out: Location, index: int, unit: Unit) -> dict[str, Any] | None:
    with contextlib.suppress(OSError, ValueError):
        marker = json.loads(out.child("units", f"{index:06d}.json").read_text())
        if marker.get("unit") == asdict(unit):
            return marker
    return None


def run_units(
    job: dict[str, Any], units: list[Unit], workers: int, address: str | None
) -> list[dict[str, Any]]:
    """Every unit's marker, in unit order, tokenizing the units not finished yet."""
    out = Location.parse(job["out"])
    markers = {i: m for i, u in enumerate(units) if (m := _finished(out, i, u)) is not None}
    todo = [(i, units[i]) for i in range(len(units)) if i not in markers]
    if todo and (workers == 1 or len(todo) == 1 or _inside_ray_task()):
        for n, (i, u) in enumerate(todo, 1):
            markers[i] = tokenize_unit(job, i, asdict(u))
            if len(todo) > 1:
                print(f"[mor] data: unit {n}/{len(todo)} tokenized", file=sys.stderr)
    elif todo:
        for marker in _ray_data_units(job, todo, workers, address):
            markers[marker["index"]] = marker
    return [markers[i] for i in range(len(units))]


def _inside_ray_task() -> bool:
    """In a Tune trial or a Train worker: its CPUs are taken, so nested tasks could wait
    forever for CPUs; such a caller prepares in its own process."""
    if "ray" not in sys.modules:
        return False
    import ray

    return ray.is_initialized() and ray.get_runtime_context().get_actor_id() is not None


@contextlib.contextmanager
def _ray_connected(address: str | None) -> Iterator[None]:
    import ray

    if ray.is_initialized():
        yield
        return
    from core.endpoints import check_ray_reachable, resolve_endpoints

    target = resolve_endpoints(ray_address=address).ray_address
    check_ray_reachable(target)
    ray.init(address=target, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


def _map_unit(row: dict[str, Any], job: dict[str, Any]) -> dict[str, Any]:
    # One core per task: the cluster's CPUs are the parallelism (tokenizers' own thread pool
    # would oversubscribe them).
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    marker = tokenize_unit(job, int(row["index"]), json.loads(row["unit"]))
    return {"marker": json.dumps(marker)}


def _ray_data_units(
    job: dict[str, Any], todo: list[tuple[int, Unit]], workers: int, address: str | None
) -> list[dict[str, Any]]:
    import ray

    with _ray_connected(address):
        cpus = int(ray.available_resources().get("CPU", 1)) or 1
        concurrency = max(1, min(len(todo), workers or cpus))
        items = [{"index": i, "unit": json.dumps(asdict(u))} for i, u in todo]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        pool = ray.data.TaskPoolStrategy(size=concurrency)
        ds = ds.map(_map_unit, fn_kwargs={"job": job}, num_cpus=1, compute=pool)
        try:
            return [json.loads(row["marker"]) for row in ds.iter_rows()]
        except Exception as exc:  # a user error inside a task arrives wrapped by Ray Data
            if (cause := _config_error(exc)) is not None:
                raise ConfigError(str(cause)) from None
            raise


def _config_error(exc: BaseException) -> BaseException | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConfigError):
            return cur
        cur = cur.__cause__ or cur.__context__
    return None
