"""Tests of the training data pipeline (trainers.data): corpus loading, splitting, caching,
tokenizers, packing and config errors. Real-corpus tests use the staged /work/shared/data."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import mor.corpus
import trainers.data as data_mod
import trainers.tokenizer as tok_mod
from mor.overrides import ConfigError, validate
from trainers.data import (
    DataConfig,
    PackedDataset,
    build_tokenizer,
    default_corpus_documents,
    load_documents,
    prepare_data,
    split_documents,
    split_text,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2" / "tokenizer.json"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
CORPUS = SHARED / "corpus"

# Small enough to train the default-corpus BPE in about a second.
SMALL = {"vocab_size": 512, "max_documents": 200}


def _need_shared() -> None:
    if not SHARED.is_dir():
        pytest.skip(f"staged data folder {SHARED} is missing")


def _synthetic_text(n_paragraphs: int, seed: int = 0) -> str:
    """Deterministic pseudo-English, blank-line separated paragraphs."""
    rng = random.Random(seed)
    words = (
        "the a model token layer depth router expert recursion shared weight cache key value "
        "train loss step small large fast slow learns reads writes and of to in"
    ).split()
    paras = []
    for _ in range(n_paragraphs):
        sents = [
            " ".join(rng.choice(words) for _ in range(rng.randint(5, 15))).capitalize() + "."
            for _ in range(rng.randint(2, 6))
        ]
        paras.append(" ".join(sents))
    return "\n\n".join(paras) + "\n"


def _segments(ids: np.ndarray, eos_id: int) -> list[np.ndarray]:
    """Split a flat token array at eos; every document must end with eos."""
    assert ids[-1] == eos_id
    cuts = np.flatnonzero(ids == eos_id)
    return np.split(ids, cuts + 1)[:-1]


@pytest.fixture(scope="module")
def small_default(tmp_path_factory: pytest.TempPathFactory) -> tuple[DataConfig, object]:
    cache = tmp_path_factory.mktemp("cache")
    cfg = DataConfig(cache_dir=str(cache), seq_len=64, **SMALL)
    return cfg, prepare_data(cfg)


@pytest.fixture
def txt_corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text(_synthetic_text(1500))
    return path


# --------------------------------------------------------------------------- default corpus


def test_default_corpus_is_large_and_deterministic() -> None:
    docs = default_corpus_documents()
    assert len(docs) > 300
    assert sum(len(d) for d in docs) > 1_000_000
    assert all(d.strip() for d in docs)
    mor.corpus._default_corpus.cache_clear()  # recompute from the files, not the memo
    assert default_corpus_documents() == docs


def test_default_prepare(small_default: tuple[DataConfig, object]) -> None:
    cfg, prep = small_default
    assert prep.vocab_size == 512 and prep.eos_id == 0
    tok = Tokenizer.from_file(str(prep.tokenizer_path))
    assert tok.token_to_id("<|endoftext|>") == 0
    train = np.load(prep.train_path)
    assert train.dtype == np.uint16
    assert len(train) == prep.num_train_tokens > 100_000
    assert len(np.load(prep.val_path)) == prep.num_val_tokens > cfg.seq_len
    assert int(train.max()) < prep.vocab_size


# --------------------------------------------------------------------------- packing


def test_packed_dataset_matches_array(small_default: tuple[DataConfig, object]) -> None:
    _, prep = small_default
    arr = np.load(prep.train_path)
    ds = PackedDataset(prep.train_path, seq_len=64)
    assert len(ds) == len(arr) // 64
    first, last = ds[0], ds[len(ds) - 1]
    assert first.dtype == torch.long and first.shape == (64,)
    assert torch.equal(first, torch.from_numpy(arr[:64].astype(np.int64)))
    end = len(ds) * 64
    assert torch.equal(last, torch.from_numpy(arr[end - 64 : end].astype(np.int64)))
    assert torch.equal(ds[-1], last)
    with pytest.raises(IndexError):
        ds[len(ds)]
    # Pickling (DataLoader workers under spawn) must not carry the array along.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._tokens is None and torch.equal(clone[3], ds[3])


def test_eos_separates_documents(small_default: tuple[DataConfig, object]) -> None:
    cfg, prep = small_default
    train_docs, val_docs = split_documents(load_documents(cfg), cfg.val_fraction)
    tok = Tokenizer.from_file(str(prep.tokenizer_path))
    for path, docs in ((prep.train_path, train_docs), (prep.val_path, val_docs)):
        segments = _segments(np.load(path), prep.eos_id)
        assert len(segments) == len(docs)
        # Byte-level BPE round-trips exactly: each segment is one whole document, in order.
        for seg, doc in zip(segments[:50], docs[:50]):
            assert tok.decode(seg[:-1].tolist()) == doc


def test_shards_are_disjoint_and_cover(small_default: tuple[DataConfig, object]) -> None:
    _, prep = small_default
    full = PackedDataset(prep.train_path, seq_len=64)
    shards = [PackedDataset(prep.train_path, 64, rank=r, world_size=2) for r in range(2)]
    assert sum(len(s) for s in shards) == len(full)
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    for r, shard in enumerate(shards):
        for i in (0, 1, len(shard) - 1):
            assert torch.equal(shard[i], full[r + 2 * i])
    even = [PackedDataset(prep.train_path, 64, r, 3, even=True) for r in range(3)]
    assert len({len(s) for s in even}) == 1 and len(even[0]) == len(full) // 3
    with pytest.raises(ValueError, match="rank"):
        PackedDataset(prep.train_path, 64, rank=2, world_size=2)


# --------------------------------------------------------------------------- split and cache


def test_split_is_deterministic_and_disjoint(
    small_default: tuple[DataConfig, object], tmp_path: Path
) -> None:
    cfg, prep = small_default
    again = prepare_data(cfg.model_copy(update={"cache_dir": str(tmp_path)}))
    assert again.train_path != prep.train_path  # really recomputed in a fresh cache
    for a, b in ((prep.train_path, again.train_path), (prep.val_path, again.val_path)):
        assert np.array_equal(np.load(a), np.load(b))
    train, val = split_documents(load_documents(cfg), cfg.val_fraction)
    assert val and train
    assert not set(val) & set(train)
    assert split_documents(load_documents(cfg), cfg.val_fraction) == (train, val)


def test_cache_reuse_does_not_retokenize(
    small_default: tuple[DataConfig, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, prep = small_default
    files = [prep.train_path, prep.val_path, prep.tokenizer_path]
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: this should not run")

    monkeypatch.setattr(data_mod, "encode_documents", fail)
    monkeypatch.setattr(data_mod, "load_documents", fail)
    monkeypatch.setattr(tok_mod, "train_bpe", fail)
    assert prepare_data(cfg) == prep
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    tok, path = build_tokenizer(cfg)
    assert path == prep.tokenizer_path and tok.get_vocab_size() == 512


def test_crash_leaves_no_complete_entry(
    txt_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = DataConfig(source=str(txt_corpus), cache_dir=str(tmp_path / "c"), vocab_size=300)
    real = data_mod.encode_documents
    calls = []

    def crash_on_val(*args: object, **kwargs: object) -> np.ndarray:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # a crash between writing train.npy and val.npy
        return real(*args, **kwargs)

    monkeypatch.setattr(data_mod, "encode_documents", crash_on_val)
    with pytest.raises(KeyboardInterrupt):
        prepare_data(cfg)
    assert not list((tmp_path / "c" / "data").glob("*/meta.json"))
    assert not list((tmp_path / "c" / "data").glob("*/.tmp-*"))
    monkeypatch.setattr(data_mod, "encode_documents", real)
    prep = prepare_data(cfg)
    assert prep.num_val_tokens > 0 and prep.val_path.is_file()


def test_changed_file_invalidates_cache(txt_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(txt_corpus), cache_dir=str(tmp_path / "c"), vocab_size=300)
    first = prepare_data(cfg)
    with open(txt_corpus, "a") as f:
        f.write("\n" + _synthetic_text(50, seed=1))
    second = prepare_data(cfg)
    assert second.train_path != first.train_path
    assert second.num_train_tokens + second.num_val_tokens > (
        first.num_train_tokens + first.num_val_tokens
    )


def test_cache_dir_defaults_to_env(
    txt_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "env-cache"))
    prep = prepare_data(DataConfig(source=str(txt_corpus), vocab_size=300))
    assert prep.train_path.is_relative_to(tmp_path / "env-cache")


# --------------------------------------------------------------------------- file formats


def test_split_text_groups_paragraphs() -> None:
    text = _synthetic_text(300)
    docs = split_text(text, doc_chars=2000)
    assert len(docs) > 10
    assert all(len(d) <= 2000 for d in docs)
    assert "\n\n".join(docs) == text.strip("\n")
    # Without blank lines a long text is still cut, at line ends.
    lines = "\n".join(f"line {i} " * 10 for i in range(2000))
    docs = split_text(lines, doc_chars=2000)
    assert len(docs) > 10 and "\n".join(docs) == lines


def test_jsonl_and_parquet(tmp_path: Path) -> None:
    import datasets

    rows = [{"body": f"document number {i}. " * 5, "n": i} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:10]))
    datasets.Dataset.from_list(rows[10:]).to_parquet(str(tmp_path / "b.parquet"))
    cfg = DataConfig(source=str(tmp_path), text_field="body", cache_dir=str(tmp_path / "c"))
    assert load_documents(cfg) == [r["body"] for r in rows]
    with pytest.raises(ConfigError, match="text_field"):
        load_documents(cfg.model_copy(update={"text_field": "text"}))
    capped = cfg.model_copy(update={"max_documents": 4})
    assert load_documents(capped) == [r["body"] for r in rows[:4]]


# --------------------------------------------------------------------------- real corpora


def test_tinyshakespeare_smollm2(tmp_path: Path) -> None:
    _need_shared()
    source = CORPUS / "tinyshakespeare" / "input.txt"
    cfg = DataConfig(source=str(source), tokenizer=str(SMOLLM2), cache_dir=str(tmp_path))
    prep = prepare_data(cfg)
    assert prep.vocab_size == 49152 and prep.eos_id == 0
    train, val = np.load(prep.train_path), np.load(prep.val_path)
    assert train.dtype == np.uint16
    assert int(train.max()) < 49152 and int(val.max()) < 49152
    assert prep.num_train_tokens > 250_000 and prep.num_val_tokens > 1_000
    assert len(load_documents(cfg)) > 100  # paragraph groups, so the hash split has material


def test_gutenberg_glob_and_directory(tmp_path: Path) -> None:
    _need_shared()
    folder = CORPUS / "gutenberg_nltk"
    glob_cfg = DataConfig(source=str(folder / "*.txt"), tokenizer=str(SMOLLM2.parent))
    docs = load_documents(glob_cfg)
    # The folder also holds a README without extension: a directory source skips it.
    assert load_documents(glob_cfg.model_copy(update={"source": str(folder)})) == docs
    assert len(docs) > 500 and any("\ufffd" in d for d in docs)  # Latin-1 bytes replaced
    prep = prepare_data(glob_cfg.model_copy(update={"cache_dir": str(tmp_path)}))
    assert prep.vocab_size == 49152 and prep.num_train_tokens > 1_000_000


def test_gpt2_tokenizer(tmp_path: Path) -> None:
    _need_shared()
    cfg = DataConfig(
        source=str(CORPUS / "tinyshakespeare" / "input.txt"),
        tokenizer=str(GPT2),
        max_documents=40,
        val_fraction=0.2,
        cache_dir=str(tmp_path),
    )
    prep = prepare_data(cfg)
    assert prep.vocab_size == 50257 and prep.eos_id == 50256
    assert np.load(prep.train_path)[-1] == 50256


# --------------------------------------------------------------------------- errors


def _write_tokenizer(path: Path, specials: list[str]) -> Path:
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", *specials])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))
    return path


@pytest.mark.parametrize("eos", ["</s>", "<eos>"])
def test_tokenizer_eos_fallbacks(tmp_path: Path, eos: str) -> None:
    path = _write_tokenizer(tmp_path / "tok.json", [eos])
    tok, got = build_tokenizer(DataConfig(tokenizer=str(path), cache_dir=str(tmp_path)))
    assert got == path.resolve() and tok.token_to_id(eos) == 3


def test_tokenizer_without_eos(tmp_path: Path) -> None:
    path = _write_tokenizer(tmp_path / "tok.json", [])
    with pytest.raises(ConfigError, match="tokenizer"):
        build_tokenizer(DataConfig(tokenizer=str(path), cache_dir=str(tmp_path)))


@pytest.mark.parametrize("name", ["missing.json", "sub/dir/tokenizer.json", "./nope"])
def test_missing_tokenizer_path(tmp_path: Path, name: str) -> None:
    cfg = DataConfig(tokenizer=str(tmp_path / name), cache_dir=str(tmp_path))
    with pytest.raises(ConfigError, match=r"tokenizer: .* does not exist"):
        prepare_data(cfg)


def test_missing_source(tmp_path: Path) -> None:
    for source in (tmp_path / "nothing.txt", tmp_path / "*.jsonl", tmp_path):
        with pytest.raises(ConfigError, match=r"source: .* matches no files"):
            load_documents(DataConfig(source=str(source), cache_dir=str(tmp_path)))


def test_empty_corpus(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n\n   \n\t\n")
    with pytest.raises(ConfigError, match="source: empty corpus"):
        prepare_data(DataConfig(source=str(tmp_path / "blank.txt"), cache_dir=str(tmp_path)))


def test_unsupported_extension(tmp_path: Path) -> None:
    (tmp_path / "data.csv").write_text("text\nhello\n")
    (tmp_path / "notes.txt").write_text("hello\n")
    for source in (tmp_path / "data.csv", tmp_path / "*"):
        with pytest.raises(ConfigError, match=r"source: unsupported file extension '\.csv'"):
            load_documents(DataConfig(source=str(source), cache_dir=str(tmp_path)))


def test_corpus_too_small(txt_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(txt_corpus), cache_dir=str(tmp_path), vocab_size=300)
    with pytest.raises(ConfigError, match=r"corpus too small.*seq_len"):
        prepare_data(cfg.model_copy(update={"seq_len": 100_000}))
    with pytest.raises(ConfigError, match=r"corpus too small.*val_fraction"):
        prepare_data(cfg.model_copy(update={"max_documents": 1}))


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("val_fraction", 0.0),
        ("val_fraction", 0.6),
        ("val_fraction", -0.1),
        ("seq_len", 1),
        ("vocab_size", 100),
        ("max_documents", 0),
        ("streaming", True),
        ("source", ""),
        ("seq_len", "long"),
        ("unknown_field", 1),
    ],
)
def test_bad_config_values(field: str, value: object) -> None:
    # The platform's config entry point (mor.overrides.validate) gives a ConfigError; plain
    # construction gives pydantic's ValidationError (a ValueError), as MoRConfig does.
    with pytest.raises(ConfigError, match=field):
        validate(DataConfig, {field: value})
    with pytest.raises(ValueError, match=field):
        DataConfig(**{field: value})


@pytest.mark.parametrize(("field", "value"), [("val_fraction", 0.9), ("seq_len", 1)])
def test_bypassed_validation_still_caught(field: str, value: object) -> None:
    cfg = DataConfig.model_construct(**{field: value})  # skips validators
    for fn in (prepare_data, load_documents, build_tokenizer):
        with pytest.raises(ConfigError, match=field):
            fn(cfg)


def test_bad_hf_source() -> None:
    with pytest.raises(ConfigError, match="source"):
        load_documents(DataConfig(source="hf:"))


def test_field_docs() -> None:
    for name, field in DataConfig.model_fields.items():
        assert field.description, f"{name} lacks a docstring"
