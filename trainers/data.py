"""Training data: stream a corpus, split it by document hash, tokenize it into token shards.

``prepare_data(cfg)`` plans the source into units (``trainers.sources``), takes the tokenizer
(or trains a byte-level BPE on a bounded sample), and tokenizes every unit into fixed-size
shards of uint16 (uint32 for vocabularies of 65,536 ids or more) under one folder:

    manifest.json      written last: shard list, token counts, tokenizer hash, source
                       fingerprint, pipeline version (its presence marks the folder complete)
    tokenizer.json     the tokenizer the shards were made with
    units/NNNNNN.json  one per finished unit: its shards and counts (what a restart skips)
    train/NNNNNN-KKKK.npy, val/NNNNNN-KKKK.npy

Units run as a Ray Data pipeline over the cluster's CPUs (a single unit, or one worker, runs
in this process). Memory is bounded by ``encode_batch_chars`` and ``shard_tokens`` per task,
never by the corpus. Every file appears under its final name only when complete (atomic
rename), so a killed preparation continues from the units it finished. Training reads the
shards memory-mapped (``trainers.windows``). The default corpus needs no network or files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator
from tokenizers import Tokenizer

from core.storage import Location, is_uri, local_cache_root
from mor.corpus import _is_val, default_corpus_documents, split_documents
from mor.overrides import ConfigError
from trainers.sources import (
    SkipCounts,
    documents,
    parse_hf,
    plan_units,
    resolve_files,
    split_text,
)
from trainers.tokenizer import (
    cache_key,
    file_sha256,
    find_eos_id,
    get_tokenizer,
    resolve_tokenizer_file,
)

__all__ = [
    "DataConfig",
    "PreparedData",
    "PreparedMix",
    "build_tokenizer",
    "default_corpus_documents",
    "load_documents",
    "prepare_data",
    "split_documents",
    "split_text",
]

PIPELINE_VERSION = 2
"""Part of every cache key and manifest: bump it when reading, splitting or tokenizing changes.
(2: streamed units and token shards.)"""
MANIFEST = "manifest.json"


class DataConfig(BaseModel):
    """Where the training text comes from, how it is tokenized, split and sharded."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = "default"
    """'default' (the embedded corpus: Python's own documentation text); a .txt/.jsonl/.parquet
    file (.txt/.jsonl may be .gz or .zst compressed), a folder (searched recursively) or a glob
    of them; 'hf:NAME[:CONFIG]' for a Hugging Face dataset (streamed; needs network); or a
    folder written by `mor data prepare` (it holds manifest.json)."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet files and Hugging Face datasets."""
    tokenizer: str | None = None
    """A tokenizer.json file (or a folder holding one), or a Hugging Face tokenizer name (needs
    network once). None trains a byte-level BPE of vocab_size on a sample of the train split."""
    vocab_size: int = 4096
    """Vocabulary of the locally trained BPE; ignored when tokenizer is given."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a hash of the document text
    (deterministic, and identical documents always land in the same split)."""
    cache_dir: str | None = None
    """Where prepared shards are cached: a folder or an object-store URI (``s3://...``); default
    ``<storage_path>/data`` when the run's storage is an object store, else $MOR_CACHE_DIR, else
    ~/.cache/mor-platform. Trained tokenizers are cached on this machine (beside local shards,
    in $MOR_CACHE_DIR or ~/.cache/mor-platform for remote ones)."""
    max_documents: int | None = None
    """Keep only the first N documents (before the split), for quick runs; read in order by
    one task."""
    shard_tokens: int = 1 << 24
    """Tokens per shard file (the last shard of each unit is shorter). 16M tokens = 32 MB at
    uint16: large enough for sequential reads, small enough to stream from object storage."""
    unit_bytes: int = 64 << 20
    """Source bytes per preparation task: large files are cut into units of about this size
    (at line ends), the grain of parallelism and of resume."""
    encode_batch_chars: int = 1 << 20
    """Characters tokenized per batch in each task: with shard_tokens, bounds its memory."""
    bpe_sample_chars: int = 64 << 20
    """The locally trained BPE learns from the first this-many characters of the train split."""
    max_document_chars: int = 100_000
    """Longer documents are cut (at paragraph, line or word ends) into pieces of at most this
    size: a pathological document costs what its length costs, once."""
    decode_errors: Literal["skip", "fail"] = "skip"
    """Undecodable input (invalid UTF-8, a JSON line that does not parse): 'skip' drops it and
    counts it in the manifest; 'fail' stops with the file and line."""
    mix: dict[str, float] | None = None
    """A weighted mixture instead of one source, e.g. {/data/web: 0.7, /data/code: 0.3}: each
    key is prepared as ``source`` would be, and training draws sequences from them in
    proportion to the weights (a source small for its weight repeats, a large one is
    subsampled). Raw sources need one tokenizer (set ``tokenizer``); prepared folders must
    share theirs. Leave ``source`` at its default."""
    prepare_workers: int = 0
    """Parallel preparation tasks: 0 = one Ray Data task per free CPU of the cluster, 1 = in
    this process, N = at most N Ray Data tasks."""

    @model_validator(mode="after")
    def _check(self) -> DataConfig:
        # As in MoRConfig: construction raises pydantic's ValidationError (a ValueError) with
        # "field: message"; mor.overrides.validate turns it into a ConfigError.
        _check_config(self)
        return self


def _check_config(cfg: DataConfig) -> None:
    if not cfg.source.strip():
        raise ConfigError("source: must not be empty; use 'default', a path, a glob or 'hf:NAME'")
    if cfg.seq_len < 2:
        raise ConfigError(f"seq_len: must be >= 2 (got {cfg.seq_len})")
    if not 0.0 < cfg.val_fraction <= 0.5:
        raise ConfigError(f"val_fraction: must lie in (0, 0.5] (got {cfg.val_fraction})")
    if cfg.tokenizer is None and cfg.vocab_size < 257:
        raise ConfigError(
            f"vocab_size: must be >= 257 (256 byte symbols + <|endoftext|>), got {cfg.vocab_size}"
        )
    if cfg.max_documents is not None and cfg.max_documents < 1:
        raise ConfigError(f"max_documents: must be >= 1 or null (got {cfg.max_documents})")
    for name, low in (
        ("shard_tokens", 1024),
        ("unit_bytes", 1 << 16),
        ("encode_batch_chars", 1024),
        ("bpe_sample_chars", 1024),
        ("max_document_chars", 256),
    ):
        if getattr(cfg, name) < low:
            raise ConfigError(f"{name}: must be >= {low} (got {getattr(cfg, name)})")
    if cfg.mix is not None:
        if not cfg.mix or any(not (w > 0 and math.isfinite(w)) for w in cfg.mix.values()):
            raise ConfigError(f"mix: give sources with positive finite weights (got {cfg.mix})")
        if cfg.source != "default":
            raise ConfigError("source: leave it unset when mix names the sources")
    if cfg.prepare_workers < 0:
        raise ConfigError(f"prepare_workers: must be >= 0 (got {cfg.prepare_workers})")


@dataclass
class PreparedData:
    """A prepared folder (see the module docstring), as read from its manifest."""

    dir: str
    """The folder: an absolute local path or an object-store URI (``core.storage``)."""
    tokenizer_path: str
    """Its tokenizer.json (same kind of location)."""
    vocab_size: int
    eos_id: int
    num_train_tokens: int
    num_val_tokens: int
    shards: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    """Per split, the shards in corpus order: {"file": path relative to dir, "tokens": n}."""
    skipped: dict[str, int] = field(default_factory=dict)
    tokenizer_sha256: str = ""

    @classmethod
    def load(cls, folder: str | Path | Location) -> PreparedData:
        loc = folder if isinstance(folder, Location) else Location.parse(folder)
        m = json.loads(loc.child(MANIFEST).read_text())
        return cls(
            dir=loc.uri,
            tokenizer_path=loc.child("tokenizer.json").uri,
            vocab_size=int(m["vocab_size"]),
            eos_id=int(m["eos_id"]),
            num_train_tokens=int(m["tokens"]["train"]),
            num_val_tokens=int(m["tokens"]["val"]),
            shards=m["shards"],
            skipped=m.get("skipped", {}),
            tokenizer_sha256=m["tokenizer_sha256"],
        )

    def windows(self, split: str, seq_len: int) -> int:
        """Sequences of ``seq_len`` in ``split`` (each shard's short tail is dropped)."""
        return sum(s["tokens"] // seq_len for s in self.shards[split])

    def folders(self) -> dict[str, float]:
        """The folders training reads, with their mixture weights."""
        return {self.dir: 1.0}


@dataclass
class PreparedMix:
    """Several prepared folders (one tokenizer) and their mixture weights (``DataConfig.mix``)."""

    parts: list[PreparedData]
    weights: list[float]

    def __post_init__(self) -> None:
        first = self.parts[0]
        self.tokenizer_path, self.vocab_size, self.eos_id = (
            first.tokenizer_path,
            first.vocab_size,
            first.eos_id,
        )
        self.num_train_tokens = sum(p.num_train_tokens for p in self.parts)
        self.num_val_tokens = sum(p.num_val_tokens for p in self.parts)

    def windows(self, split: str, seq_len: int) -> int:
        """The smallest source's sequences: each source must serve every rank on its own."""
        return min(p.windows(split, seq_len) for p in self.parts)

    def folders(self) -> dict[str, float]:
        return {p.dir: w for p, w in zip(self.parts, self.weights)}


# --------------------------------------------------------------------------- keys


def _cache_root(cfg: DataConfig) -> Path:
    """This machine's cache of tokenizers (and of shards when ``cache_dir`` is local)."""
    if cfg.cache_dir and not is_uri(cfg.cache_dir):
        return Path(cfg.cache_dir).expanduser()
    return local_cache_root()


def _data_root(cfg: DataConfig) -> Location:
    """Where prepared folders are cached: ``cache_dir`` (a folder or a URI), else locally."""
    return Location.parse(cfg.cache_dir) if cfg.cache_dir else Location.parse(_cache_root(cfg))


def _source_fingerprint(cfg: DataConfig) -> str:
    """Cheap identity of the corpus, so a cache hit needs no reading of the documents."""
    if cfg.source == "default":
        return f"default|{sys.version}"
    if cfg.source.startswith("hf:"):
        # A hub dataset has no cheap version check; its name stands for its content.
        return "|".join(map(str, parse_hf(cfg.source)))
    digest = hashlib.blake2b(digest_size=16)
    for f in resolve_files(cfg.source):
        st = f.stat()
        digest.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _corpus_key(cfg: DataConfig) -> str:
    # Everything that decides which documents form each split.
    return cache_key(
        PIPELINE_VERSION,
        _source_fingerprint(cfg),
        cfg.text_field,
        cfg.max_documents,
        cfg.val_fraction,
        cfg.unit_bytes,
        cfg.max_document_chars,
        cfg.decode_errors,
    )


def _is_prepared(source: str) -> bool:
    """A folder (local or object store) holding a finished preparation."""
    if source == "default" or source.startswith("hf:") or any(c in source for c in "*?["):
        return False
    return Location.parse(source).child(MANIFEST).is_file()


# --------------------------------------------------------------------------- documents


def iter_documents(cfg: DataConfig, skips: SkipCounts | None = None) -> Iterator[str]:
    """All documents of ``cfg.source`` in corpus order, streamed (before the split)."""
    _check_config(cfg)
    skips = skips if skips is not None else SkipCounts()
    units = plan_units(cfg.source, cfg.unit_bytes, capped=cfg.max_documents is not None)
    for unit in units:
        yield from documents(
            unit,
            cfg.text_field,
            cfg.decode_errors,
            cfg.max_document_chars,
            skips,
            cfg.max_documents,
        )


def load_documents(cfg: DataConfig) -> list[str]:
    """The documents of ``cfg.source`` as a list: for small corpora and tests only (training
    never materialises a corpus). Raises ConfigError for an empty corpus."""
    skips = SkipCounts()
    docs = list(iter_documents(cfg, skips))
    if not docs:
        raise _empty_corpus(cfg, skips)
    return docs


def _empty_corpus(cfg: DataConfig, skips: SkipCounts) -> ConfigError:
    if skips.missing_field and skips.columns:
        return ConfigError(
            f"text_field: {cfg.text_field!r} is not a column of {cfg.source!r}; columns: "
            f"{skips.columns}"
        )
    extra = f" ({skips.undecodable} undecodable lines/blocks skipped)" if skips.undecodable else ""
    return ConfigError(f"source: empty corpus: {cfg.source!r} yields no non-empty documents{extra}")


def _bpe_sample(cfg: DataConfig) -> Iterator[str]:
    """The train split's first ``bpe_sample_chars`` characters: what a local BPE learns from."""
    left = cfg.bpe_sample_chars
    skips = SkipCounts()
    found = False
    for doc in iter_documents(cfg, skips):
        if _is_val(doc, cfg.val_fraction):
            continue
        found = True
        yield doc[:left]
        left -= len(doc)
        if left <= 0:
            return
    if not found:
        raise _empty_corpus(cfg, skips)


def build_tokenizer(cfg: DataConfig) -> tuple[Tokenizer, Path]:
    """The tokenizer of ``cfg`` and its tokenizer.json path.

    With ``cfg.tokenizer`` set, that file (or hub tokenizer) is loaded. Otherwise a byte-level
    BPE is trained on a bounded sample of the train split and cached under a key of the corpus
    and vocab_size, so later calls load it.
    """
    _check_config(cfg)
    key = cache_key(_corpus_key(cfg), cfg.bpe_sample_chars)
    return get_tokenizer(
        cfg.tokenizer, cfg.vocab_size, _cache_root(cfg), key, lambda: _bpe_sample(cfg)
    )


# --------------------------------------------------------------------------- preparation


def prepare_data(
    cfg: DataConfig, out: str | Path | None = None, address: str | None = None
) -> PreparedData | PreparedMix:
    """Prepare ``cfg``'s corpus into ``out`` (default: a cache folder keyed by every input)
    and return it. A complete folder is reused; a partial one is continued. ``address`` is the
    Ray cluster for the parallel stage when Ray is not connected yet."""
    _check_config(cfg)
    if cfg.mix is not None:
        return _prepare_mix(cfg, address)
    if _is_prepared(cfg.source):
        data = _check_prepared(cfg)
    else:
        tok, tok_path = build_tokenizer(cfg)
        key = cache_key(_corpus_key(cfg), file_sha256(tok_path), cfg.shard_tokens)
        folder = Location.parse(out) if out else _data_root(cfg).child("data", key)
        if _manifest_key(folder) == key:
            data = PreparedData.load(folder)
        else:
            data = _prepare(cfg, tok, tok_path, key, folder, address)
    _check_sizes(cfg, data)
    return data


def _prepare_mix(cfg: DataConfig, address: str | None) -> PreparedMix:
    if cfg.tokenizer is None and not all(_is_prepared(src) for src in cfg.mix):
        raise ConfigError(
            "tokenizer: a mix of raw sources needs one tokenizer for all; set data.tokenizer "
            "(or prepare each source with the same --tokenizer)"
        )
    parts = [
        prepare_data(cfg.model_copy(update={"source": src, "mix": None}), address=address)
        for src in cfg.mix
    ]
    if len({p.tokenizer_sha256 for p in parts}) > 1:
        raise ConfigError(f"mix: the sources were prepared with different tokenizers: {cfg.mix}")
    return PreparedMix(parts, list(cfg.mix.values()))


def _manifest_key(folder: Location) -> str | None:
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads(folder.child(MANIFEST).read_text())["key"]
    return None


def _check_prepared(cfg: DataConfig) -> PreparedData:
    loc = Location.parse(cfg.source)
    data = PreparedData.load(loc)
    if cfg.tokenizer is not None:
        tok_path = resolve_tokenizer_file(cfg.tokenizer, _cache_root(cfg))
        manifest = json.loads(loc.child(MANIFEST).read_text())
        if file_sha256(tok_path) != manifest["tokenizer_sha256"]:
            raise ConfigError(
                f"tokenizer: {cfg.tokenizer!r} is not the tokenizer {cfg.source!r} was prepared "
                "with; leave data.tokenizer unset to use the folder's own"
            )
    return data


def _check_sizes(cfg: DataConfig, data: PreparedData) -> None:
    for split, n in (("train", data.num_train_tokens), ("val", data.num_val_tokens)):
        if data.windows(split, cfg.seq_len) < 1:
            raise ConfigError(
                f"source: corpus too small: the {split} split holds {n} tokens, not one "
                f"sequence of seq_len = {cfg.seq_len}; use a larger source or max_documents, "
                f"a smaller seq_len, or a different val_fraction (now {cfg.val_fraction})"
            )


def _prepare(
    cfg: DataConfig,
    tok: Tokenizer,
    tok_path: Path,
    key: str,
    folder: Location,
    address: str | None,
) -> PreparedData:
    from trainers.prepare import run_units  # the executor: inline or Ray Data

    units = plan_units(cfg.source, cfg.unit_bytes, capped=cfg.max_documents is not None)
    _claim_folder(folder, key, cfg)
    if not folder.child("tokenizer.json").is_file():
        folder.child("tokenizer.json").write_bytes(tok_path.read_bytes())
    vocab = tok.get_vocab_size()
    job = {
        "out": folder.uri,
        "tokenizer": folder.child("tokenizer.json").uri,
        "eos_id": find_eos_id(tok),
        "vocab_size": vocab,
        "dtype": "uint16" if vocab < 2**16 else "uint32",
        "shard_tokens": cfg.shard_tokens,
        "val_fraction": cfg.val_fraction,
        "text_field": cfg.text_field,
        "decode_errors": cfg.decode_errors,
        "max_document_chars": cfg.max_document_chars,
        "encode_batch_chars": cfg.encode_batch_chars,
        "max_documents": cfg.max_documents,
    }
    markers = run_units(job, units, cfg.prepare_workers, address)
    return _write_manifest(cfg, folder, key, job, markers, file_sha256(tok_path))


def _claim_folder(folder: Location, key: str, cfg: DataConfig) -> None:
    """A folder holds one preparation: continue our own, refuse to mix in another's."""
    job_file = folder.child("job.json")
    if job_file.is_file():
        if json.loads(job_file.read_text()).get("key") != key:
            raise ConfigError(
                f"out: {str(folder)!r} holds a preparation of different inputs (source, "
                "tokenizer or data settings); choose an empty folder"
            )
        return
    # Dot-files are another process's temp files, racing to claim the same cache folder.
    if any(not name.startswith(".") for name in folder.names()):
        raise ConfigError(f"out: {str(folder)!r} is not empty and not a preparation folder")
    record = {"key": key, "source": cfg.source, "pipeline_version": PIPELINE_VERSION}
    job_file.write_text(json.dumps(record))


def _write_manifest(
    cfg: DataConfig,
    folder: Location,
    key: str,
    job: dict[str, Any],
    markers: list[dict[str, Any]],
    tokenizer_sha256: str,
) -> PreparedData:
    skips = SkipCounts()
    shards: dict[str, list[dict[str, Any]]] = {"train": [], "val": []}
    docs = {"train": 0, "val": 0}
    for marker in markers:  # in unit order: the corpus order
        for split in shards:
            shards[split].extend(marker["shards"][split])
            docs[split] += marker["documents"][split]
        skips.undecodable += marker["skipped"]["undecodable"]
        skips.missing_field += marker["skipped"]["missing_field"]
        skips.columns = skips.columns or marker.get("columns", [])
    if docs["train"] + docs["val"] == 0:
        raise _empty_corpus(cfg, skips)
    manifest = {
        "key": key,
        "pipeline_version": PIPELINE_VERSION,
        "source": cfg.source,
        "source_fingerprint": _source_fingerprint(cfg),
        "tokenizer_sha256": tokenizer_sha256,
        "vocab_size": job["vocab_size"],
        "eos_id": job["eos_id"],
        "dtype": job["dtype"],
        "units": len(markers),
        "documents": docs,
        "tokens": {s: sum(x["tokens"] for x in shards[s]) for s in shards},
        "skipped": skips.to_dict(),
        "shards": shards,
    }
    # manifest.json goes last: its presence marks the folder complete.
    folder.child(MANIFEST).write_text(json.dumps(manifest, indent=1))
    return PreparedData.load(folder)
