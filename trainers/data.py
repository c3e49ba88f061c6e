"""Training data: load a corpus, split it by document hash, tokenize, cache, and pack.

``prepare_data(cfg)`` writes two flat token arrays (train, val: documents each followed by
end-of-text) as cached .npy files; ``PackedDataset`` serves rank-sharded fixed-length windows.
The default corpus needs no network or files: the documentation text shipped with Python.
"""

from __future__ import annotations

import glob
import hashlib
import itertools
import json
import operator
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, model_validator
from tokenizers import Tokenizer

from mor.corpus import default_corpus_documents, split_documents
from mor.overrides import ConfigError
from trainers.tokenizer import (
    atomic_write,
    cache_key,
    encode_documents,
    file_sha256,
    find_eos_id,
    get_tokenizer,
)

__all__ = [
    "DataConfig",
    "PackedDataset",
    "PreparedData",
    "build_tokenizer",
    "default_corpus_documents",
    "load_documents",
    "prepare_data",
    "split_documents",
    "split_text",
]

PIPELINE_VERSION = 1
"""Part of every cache key: bump it when loading, splitting or tokenizing changes."""
SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOC_CHARS = 8000
"""Target size of one .txt document: small enough that a single-file corpus (TinyShakespeare)
still has many documents for the hash split, large enough to keep long-range context."""


class DataConfig(BaseModel):
    """Where the training text comes from, how it is tokenized, split and cached."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    source: str = "default"
    """'default' (the embedded corpus: Python's own documentation text), a .txt/.jsonl/.parquet
    file, a directory (searched recursively for those), a glob, or 'hf:NAME[:CONFIG]' for a
    Hugging Face dataset (needs network)."""
    text_field: str = "text"
    """Column holding the text in .jsonl/.parquet files and Hugging Face datasets."""
    tokenizer: str | None = None
    """A tokenizer.json file (or a folder holding one), or a Hugging Face tokenizer name (needs
    network once). None trains a byte-level BPE of vocab_size on the train split (cached)."""
    vocab_size: int = 4096
    """Vocabulary of the locally trained BPE; ignored when tokenizer is given."""
    seq_len: int = 128
    """Tokens per packed training sequence."""
    val_fraction: float = 0.05
    """Fraction of documents held out for validation, chosen by a hash of the document text
    (deterministic, and identical documents always land in the same split)."""
    cache_dir: str | None = None
    """Where tokenizers and token arrays are cached; default $MOR_CACHE_DIR, else
    ~/.cache/mor-platform."""
    max_documents: int | None = None
    """Keep only the first N documents (before the split), for quick runs."""
    streaming: bool = False
    """Stream an 'hf:' dataset instead of downloading it whole (Hugging Face sources only)."""

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
    if cfg.streaming and not cfg.source.startswith("hf:"):
        raise ConfigError("streaming: only applies to 'hf:' sources; set it to false")


@dataclass
class PreparedData:
    """Paths and sizes of a tokenized, split corpus (see ``prepare_data``)."""

    train_path: Path
    val_path: Path
    tokenizer_path: Path
    vocab_size: int
    eos_id: int
    num_train_tokens: int
    num_val_tokens: int


# --------------------------------------------------------------------------- documents


def split_text(text: str, doc_chars: int = TXT_DOC_CHARS) -> list[str]:
    """Cut plain text into documents of about ``doc_chars``: blank-line separated paragraphs
    are grouped, and a paragraph longer than that is cut at line ends."""
    text = text.replace("\r\n", "\n")
    paragraphs: list[str] = []
    for para in re.split(r"\n(?:[ \t]*\n)+", text):
        para = para.strip("\n")  # keep indentation (verse, code), drop stray line ends
        if not para.strip():
            continue
        if len(para) <= doc_chars:
            paragraphs.append(para)
        else:
            paragraphs.extend(_group(para.split("\n"), doc_chars, "\n"))
    return _group(paragraphs, doc_chars, "\n\n")


def _group(pieces: list[str], limit: int, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in pieces:
        if cur and size + len(piece) > limit:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece) + len(sep)
    if cur:
        out.append(sep.join(cur))
    return out


def _resolve_files(source: str) -> list[Path]:
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file()]
    elif path.is_dir():
        # A folder may hold READMEs and licences next to the data: take only known types.
        files = [
            f
            for f in path.rglob("*")
            if f.is_file() and f.suffix.lower() in SUFFIXES and not f.name.startswith(".")
        ]
    else:
        files = [path] if path.is_file() else []
    if not files:
        raise ConfigError(
            f"source: {source!r} matches no files; give 'default', an existing file, a folder "
            f"or glob of {'/'.join(SUFFIXES)} files, or 'hf:NAME[:CONFIG]'"
        )
    for f in files:
        if f.suffix.lower() not in SUFFIXES:
            raise ConfigError(
                f"source: unsupported file extension {f.suffix or '(none)'!r} of {str(f)!r}; "
                f"allowed: {', '.join(SUFFIXES)}"
            )
    return sorted(f.resolve() for f in files)


def _parse_hf(source: str) -> tuple[str, str | None]:
    name, _, config = source[len("hf:") :].partition(":")
    if not name:
        raise ConfigError(f"source: {source!r} names no dataset; use 'hf:NAME' or 'hf:NAME:CONFIG'")
    return name, config or None


def _rows_text(
    rows: Iterable[dict[str, Any]], field: str, what: str, limit: int | None
) -> list[str]:
    texts: list[str] = []
    for row in rows:
        if field not in row:
            raise ConfigError(
                f"text_field: {field!r} is not a column of {what}; columns: {sorted(row)}"
            )
        value = row[field]
        if isinstance(value, str) and value.strip():
            texts.append(value)
            if limit is not None and len(texts) >= limit:
                break
    return texts


def _table_documents(suffix: str, files: list[Path], cfg: DataConfig) -> list[str]:
    import datasets  # slow import; only table and hub sources need it

    builder = "json" if suffix == ".jsonl" else "parquet"
    ds = datasets.load_dataset(
        builder,
        data_files=[str(f) for f in files],
        split="train",
        cache_dir=str(_cache_root(cfg) / "hf-datasets"),
    )
    if cfg.text_field not in ds.column_names:
        raise ConfigError(
            f"text_field: {cfg.text_field!r} is not a column of {[f.name for f in files][:3]}; "
            f"columns: {ds.column_names}"
        )
    return [t for t in ds[cfg.text_field] if isinstance(t, str)]


def load_documents(cfg: DataConfig) -> list[str]:
    """The raw, non-empty documents of ``cfg.source`` in a deterministic order, capped at
    ``max_documents``. Raises ConfigError for missing/unsupported sources or an empty corpus."""
    _check_config(cfg)
    cap = cfg.max_documents
    if cfg.source == "default":
        docs = default_corpus_documents()
    elif cfg.source.startswith("hf:"):
        import datasets

        name, config = _parse_hf(cfg.source)
        ds = datasets.load_dataset(name, config, split="train", streaming=cfg.streaming)
        docs = _rows_text(ds, cfg.text_field, f"dataset {name!r}", cap)
    else:
        docs = []
        files = _resolve_files(cfg.source)
        # Consecutive files of one type go to datasets together; the order stays sorted.
        for suffix, run in itertools.groupby(files, key=lambda f: f.suffix.lower()):
            group = list(run)
            if suffix == ".txt":
                for f in group:
                    docs.extend(split_text(f.read_bytes().decode("utf-8", errors="replace")))
            else:
                docs.extend(_table_documents(suffix, group, cfg))
            if cap is not None and len(docs) >= cap:
                break
    # Lone surrogates (possible in docstrings and JSON escapes) would crash the Rust tokenizer.
    docs = [d.encode("utf-8", "replace").decode("utf-8") for d in docs if d.strip()]
    docs = docs[:cap] if cap is not None else docs
    if not docs:
        raise ConfigError(f"source: empty corpus: {cfg.source!r} yields no non-empty documents")
    return docs


# --------------------------------------------------------------------------- caching


def _cache_root(cfg: DataConfig) -> Path:
    root = cfg.cache_dir or os.environ.get("MOR_CACHE_DIR") or "~/.cache/mor-platform"
    return Path(root).expanduser()


def _source_fingerprint(cfg: DataConfig) -> str:
    """Cheap identity of the corpus, so a cache hit needs no reading of the documents."""
    if cfg.source == "default":
        return f"default|{sys.version}"
    if cfg.source.startswith("hf:"):
        # A hub dataset has no cheap version check; its name stands for its content.
        return "|".join(map(str, _parse_hf(cfg.source)))
    files = _resolve_files(cfg.source)
    return json.dumps([[str(f), f.stat().st_size, f.stat().st_mtime_ns] for f in files])


def build_tokenizer(cfg: DataConfig, documents: list[str] | None = None) -> tuple[Tokenizer, Path]:
    """The tokenizer of ``cfg`` and its tokenizer.json path.

    With ``cfg.tokenizer`` set, that file (or hub tokenizer) is loaded. Otherwise a byte-level
    BPE is trained on ``documents`` (default: the train split of ``cfg``'s corpus) and cached
    under a key of the corpus fingerprint and vocab_size, so later calls load it.
    """
    _check_config(cfg)
    if documents is None:
        corpus, docs = _corpus_fingerprint(cfg), lambda: _splits(cfg)[0]
    else:
        digest = hashlib.blake2b(digest_size=16)
        for d in documents:
            digest.update(d.encode("utf-8", "replace") + b"\0")
        corpus, docs = "docs|" + digest.hexdigest(), lambda: list(documents)
    return get_tokenizer(cfg.tokenizer, cfg.vocab_size, _cache_root(cfg), corpus, docs)


def _corpus_fingerprint(cfg: DataConfig) -> str:
    # Everything that decides which documents form the train split.
    return cache_key(
        PIPELINE_VERSION,
        _source_fingerprint(cfg),
        cfg.text_field,
        cfg.max_documents,
        cfg.val_fraction,
    )


def _splits(cfg: DataConfig) -> tuple[list[str], list[str]]:
    return split_documents(load_documents(cfg), cfg.val_fraction)


def prepare_data(cfg: DataConfig) -> PreparedData:
    """Load, split, tokenize and cache ``cfg``'s corpus; return where the arrays are.

    The arrays are keyed by the source fingerprint (paths, sizes, mtimes), the tokenizer file's
    hash, val_fraction, max_documents and text_field; a second call with the same inputs reads
    only the small meta.json. seq_len is not part of the key (packing happens at load time).
    """
    _check_config(cfg)
    corpus = _corpus_fingerprint(cfg)
    memo: list[tuple[list[str], list[str]]] = []

    def splits() -> tuple[list[str], list[str]]:
        if not memo:  # load the corpus at most once, and only on a cache miss
            memo.append(_splits(cfg))
        return memo[0]

    tok, tok_path = get_tokenizer(
        cfg.tokenizer, cfg.vocab_size, _cache_root(cfg), corpus, lambda: splits()[0]
    )
    eos_id, vocab_size = find_eos_id(tok), tok.get_vocab_size()
    key = cache_key(corpus, file_sha256(tok_path))
    out = _cache_root(cfg) / "data" / key
    meta_path = out / "meta.json"
    files_ok = (out / "train.npy").is_file() and (out / "val.npy").is_file()
    if meta_path.is_file() and files_ok:
        meta = json.loads(meta_path.read_text())
    else:
        train_docs, val_docs = splits()
        meta = {"source": cfg.source, "tokenizer": str(tok_path), "vocab_size": vocab_size}
        for name, docs in (("train", train_docs), ("val", val_docs)):
            ids = encode_documents(tok, docs, eos_id, vocab_size)
            atomic_write(out / f"{name}.npy", lambda f, ids=ids: np.save(f, ids))
            meta[f"num_{name}_tokens"] = len(ids)
            meta[f"num_{name}_documents"] = len(docs)
        # meta.json goes last: its presence marks the entry complete.
        atomic_write(meta_path, lambda f: f.write(json.dumps(meta, indent=1).encode()))
    data = PreparedData(
        train_path=out / "train.npy",
        val_path=out / "val.npy",
        tokenizer_path=tok_path,
        vocab_size=vocab_size,
        eos_id=eos_id,
        num_train_tokens=int(meta["num_train_tokens"]),
        num_val_tokens=int(meta["num_val_tokens"]),
    )
    for split, n in (("train", data.num_train_tokens), ("val", data.num_val_tokens)):
        if n < cfg.seq_len + 1:
            raise ConfigError(
                f"source: corpus too small: the {split} split holds {n} tokens, fewer than "
                f"seq_len + 1 = {cfg.seq_len + 1}; use a larger source or max_documents, a "
                f"smaller seq_len, or a different val_fraction (now {cfg.val_fraction})"
            )
    return data


# --------------------------------------------------------------------------- packing


class PackedDataset(torch.utils.data.Dataset):
    """Non-overlapping windows ``tokens[j*seq_len : (j+1)*seq_len]`` of a token .npy (the short
    tail is dropped), as LongTensors [seq_len] that serve as inputs and labels (the model shifts
    internally). Rank r of world_size gets windows r, r+world_size, ...; ``even=True`` gives
    every rank windows // world_size of them so that DDP ranks take equal step counts."""

    def __init__(
        self, path: Path, seq_len: int, rank: int = 0, world_size: int = 1, even: bool = False
    ) -> None:
        if seq_len < 2:
            raise ConfigError(f"seq_len: must be >= 2 (got {seq_len})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got {rank} of {world_size}")
        self.path, self.seq_len = Path(path), seq_len
        self.rank, self.world_size = rank, world_size
        self._tokens: np.ndarray | None = np.load(self.path, mmap_mode="r")
        if self._tokens.ndim != 1:
            raise ValueError(f"{self.path} must hold a 1-D token array")
        self.num_windows = len(self._tokens) // seq_len  # over all ranks together
        if even:
            self._len = self.num_windows // world_size
        else:
            self._len = len(range(rank, self.num_windows, world_size))

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> torch.Tensor:
        i = operator.index(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} sequences")
        if self._tokens is None:  # reopened lazily after pickling into a worker
            self._tokens = np.load(self.path, mmap_mode="r")
        start = (self.rank + i * self.world_size) * self.seq_len
        window = self._tokens[start : start + self.seq_len]
        return torch.from_numpy(window.astype(np.int64))

    def __getstate__(self) -> dict[str, Any]:
        # A pickled memmap would copy the whole array into every DataLoader worker.
        state = dict(self.__dict__)
        state["_tokens"] = None
        return state
