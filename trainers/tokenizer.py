"""Tokenizer helpers for the data pipeline: resolve and load a tokenizer.json or hub tokenizer,
find its end-of-text token, train (and cache) a byte-level BPE, and encode documents.

``trainers.data`` decides the cache keys; ``get_tokenizer`` stores a trained BPE under one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from tokenizers import trainers as tk_trainers

from core.storage import atomic_write
from mor.overrides import ConfigError

__all__ = [
    "EOS_CANDIDATES",
    "EOS_TOKEN",
    "atomic_write",
    "cache_key",
    "encode_documents",
    "file_sha256",
    "find_eos_id",
    "get_tokenizer",
    "load_tokenizer",
    "resolve_tokenizer_file",
    "save_tokenizer",
    "train_bpe",
]

EOS_TOKEN = "<|endoftext|>"
"""The special token a locally trained BPE gets as id 0 (GPT-2 / SmolLM naming)."""
EOS_CANDIDATES = (EOS_TOKEN, "</s>", "<eos>")
"""Names tried, in order, as the document separator of a given tokenizer."""
BPE_VERSION = 1
"""Part of the trained-BPE cache key: bump it when train_bpe changes."""
ENCODE_BATCH = 512


def file_sha256(path: Path) -> str:
    """Content hash of a file, so that a changed tokenizer invalidates cached token arrays."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _looks_like_path(name: str) -> bool:
    # A hub id is "name" or "org/name"; anything absolute, dotted, home-based, deeper or
    # ending in .json is a local path, and a missing one must not be sent to the hub.
    return (
        name.startswith(("/", ".", "~"))
        or name.endswith(".json")
        or name.count("/") > 1
        or "\\" in name
    )


def resolve_tokenizer_file(name: str, cache_dir: Path) -> Path:
    """Return a local tokenizer.json for ``name``: a file, a folder holding tokenizer.json, or
    a Hugging Face hub id (downloaded once, then saved under ``cache_dir``)."""
    p = Path(name).expanduser()
    if p.is_dir():
        p = p / "tokenizer.json"
        if not p.is_file():
            raise ConfigError(f"tokenizer: folder {name!r} holds no tokenizer.json")
        return p.resolve()
    if p.is_file():
        return p.resolve()
    if _looks_like_path(name):
        raise ConfigError(
            f"tokenizer: {name!r} does not exist; give a tokenizer.json file, a folder holding "
            "one, a Hugging Face tokenizer name, or null to train a BPE on the corpus"
        )
    safe = name.replace("/", "--")
    cached = cache_dir / "tokenizers" / f"hf-{safe}" / "tokenizer.json"
    if cached.is_file():  # reuse so that later runs work offline
        return cached
    try:
        tok = Tokenizer.from_pretrained(name)
    except Exception as exc:
        raise ConfigError(
            f"tokenizer: {name!r} is neither an existing tokenizer.json path nor a Hugging Face "
            f"tokenizer that could be downloaded ({type(exc).__name__}: {exc})"
        ) from None
    save_tokenizer(tok, cached)
    return cached


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a tokenizer.json; a corrupt file gives a ConfigError naming ``tokenizer``."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ConfigError(f"tokenizer: cannot load {str(path)!r}: {exc}") from None


def find_eos_id(tok: Tokenizer) -> int:
    """Id of the first of EOS_CANDIDATES the tokenizer knows, else a ConfigError."""
    for name in EOS_CANDIDATES:
        tid = tok.token_to_id(name)
        if tid is not None:
            return int(tid)
    raise ConfigError(
        f"tokenizer: has none of the end-of-text tokens {list(EOS_CANDIDATES)}; documents need "
        "a separator, so use a tokenizer that defines one"
    )


def train_bpe(documents: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE (GPT-2 style) with ``<|endoftext|>`` as id 0.

    The full 256-byte alphabet is seeded so that any text, including bytes the corpus never
    shows, encodes without an unknown token.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = tk_trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(documents, trainer=trainer)
    return tok


def save_tokenizer(tok: Tokenizer, path: Path) -> None:
    """Write ``tok`` to ``path`` atomically."""
    atomic_write(path, lambda f: f.write(tok.to_str(pretty=True).encode("utf-8")))


def cache_key(*parts: Any) -> str:
    """A short hex digest of JSON-serialisable ``parts``."""
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=10).hexdigest()


def get_tokenizer(
    spec: str | None,
    vocab_size: int,
    cache_dir: Path,
    corpus_key: str,
    train_docs: Callable[[], list[str]],
) -> tuple[Tokenizer, Path]:
    """Load the tokenizer ``spec`` names, or (``spec`` None) the BPE trained on the corpus
    identified by ``corpus_key``, training it on ``train_docs()`` and caching it if absent.
    ``train_docs`` is only called on a cache miss."""
    if spec is not None:
        path = resolve_tokenizer_file(spec, cache_dir)
        tok = load_tokenizer(path)
        find_eos_id(tok)  # fail now, not after loading a corpus
        return tok, path
    key = cache_key(BPE_VERSION, corpus_key, vocab_size)
    path = cache_dir / "tokenizers" / f"bpe-{key}" / "tokenizer.json"
    if path.is_file():
        return load_tokenizer(path), path
    tok = train_bpe(train_docs(), vocab_size)
    save_tokenizer(tok, path)
    return tok, path


def encode_documents(tok: Tokenizer, docs: list[str], eos_id: int, vocab_size: int) -> np.ndarray:
    """Token ids of ``docs``, each followed by ``eos_id``, as one flat array: uint16 when
    ``vocab_size`` < 65536 (half the disk and page cache), else uint32."""
    dtype = np.uint16 if vocab_size < 2**16 else np.uint32
    parts: list[np.ndarray] = []
    eos = np.array([eos_id], dtype=np.int64)
    for i in range(0, len(docs), ENCODE_BATCH):
        # BOS/EOS post-processing is off: documents get exactly one separator, ours.
        for enc in tok.encode_batch(docs[i : i + ENCODE_BATCH], add_special_tokens=False):
            parts.append(np.asarray(enc.ids, dtype=np.int64))
            parts.append(eos)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if ids.size and int(ids.max()) >= vocab_size:
        raise ConfigError(f"tokenizer: produced id {int(ids.max())} >= its vocab size {vocab_size}")
    return ids.astype(dtype)
