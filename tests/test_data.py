"""Tests of the training data pipeline (trainers.data): corpus loading, splitting, caching,
tokenizers, packing and config errors. Real-corpus tests use the staged /work/shared/data."""

from __future__ import annotations

import json
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

import mor.corpus
import trainers.data as data_mod
import trainers.prepare as prep_mod
import trainers.tokenizer as tok_mod
from mor.overrides import ConfigError, validate
from trainers.data import (
    DataConfig,
    PreparedData,
    build_tokenizer,
    default_corpus_documents,
    load_documents,
    prepare_data,
    split_documents,
    split_text,
)
from trainers.sources import SkipCounts
from trainers.windows import TokenWindows, open_windows

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SMOLLM2 = SHARED / "tokenizers" / "smollm2" / "tokenizer.json"
GPT2 = SHARED / "tokenizers" / "gpt2" / "tokenizer.json"
CORPUS = SHARED / "corpus"

# Small enough to train the default-corpus BPE in about a second.
SMALL = {"vocab_size": 512, "max_documents": 200}
MOR = str(Path(sys.executable).with_name("mor"))


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
    train = _split_tokens(prep, "train")
    assert train.dtype == np.uint16
    assert len(train) == prep.num_train_tokens > 100_000
    assert len(_split_tokens(prep, "val")) == prep.num_val_tokens > cfg.seq_len
    assert int(train.max()) < prep.vocab_size
    manifest = json.loads((Path(prep.dir) / "manifest.json").read_text())
    assert manifest["pipeline_version"] == data_mod.PIPELINE_VERSION
    assert manifest["tokenizer_sha256"] == tok_mod.file_sha256(Path(prep.tokenizer_path))


# --------------------------------------------------------------------------- shards and windows


def _split_tokens(prep: PreparedData, split: str) -> np.ndarray:
    return np.concatenate([np.load(Path(prep.dir) / s["file"]) for s in prep.shards[split]])


def test_windows_match_shards(small_default: tuple[DataConfig, object]) -> None:
    _, prep = small_default
    arr = _split_tokens(prep, "train")
    ds = TokenWindows(prep.dir, "train", seq_len=64)
    assert len(ds) == len(arr) // 64  # one shard here
    first, last = ds[0], ds[len(ds) - 1]
    assert first.dtype == torch.long and first.shape == (64,)
    assert torch.equal(first, torch.from_numpy(arr[:64].astype(np.int64)))
    end = len(ds) * 64
    assert torch.equal(last, torch.from_numpy(arr[end - 64 : end].astype(np.int64)))
    assert torch.equal(ds[-1], last)
    with pytest.raises(IndexError):
        ds[len(ds)]
    # Pickling (DataLoader workers under spawn) must not carry the memory maps along.
    ds.shuffled(0, 0, 5)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps == {} and torch.equal(clone[3], ds[3])


def test_eos_separates_documents(small_default: tuple[DataConfig, object]) -> None:
    cfg, prep = small_default
    train_docs, val_docs = split_documents(load_documents(cfg), cfg.val_fraction)
    tok = Tokenizer.from_file(str(prep.tokenizer_path))
    for split, docs in (("train", train_docs), ("val", val_docs)):
        segments = _segments(_split_tokens(prep, split), prep.eos_id)
        assert len(segments) == len(docs)
        # Byte-level BPE round-trips exactly: each segment is one whole document, in order.
        for seg, doc in zip(segments[:50], docs[:50]):
            assert tok.decode(seg[:-1].tolist()) == doc


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory: pytest.TempPathFactory) -> PreparedData:
    """A txt corpus cut into several units, each into several small shards."""
    tmp = tmp_path_factory.mktemp("shards")
    (tmp / "corpus.txt").write_text(_synthetic_text(3000))
    cfg = DataConfig(
        source=str(tmp / "corpus.txt"),
        cache_dir=str(tmp / "c"),
        vocab_size=300,
        unit_bytes=1 << 17,
        shard_tokens=4096,
        prepare_workers=1,
        seq_len=64,
    )
    return prepare_data(cfg)


def test_units_and_shards_keep_the_corpus_order(many_shards: PreparedData) -> None:
    prep = many_shards
    assert len({s["file"].split("-")[0] for s in prep.shards["train"]}) > 2  # several units
    assert sum(s["tokens"] == 4096 for s in prep.shards["train"]) > 10  # fixed-size shards
    assert all(s["tokens"] <= 4096 for split in ("train", "val") for s in prep.shards[split])
    # The shards, in manifest order, are the documents of the corpus in order.
    corpus = Path(prep.dir).parent.parent.parent / "corpus.txt"
    cfg = DataConfig(source=str(corpus), unit_bytes=1 << 17)
    train, _ = split_documents(load_documents(cfg), cfg.val_fraction)
    tok = Tokenizer.from_file(str(prep.tokenizer_path))
    segments = _segments(_split_tokens(prep, "train"), prep.eos_id)
    assert len(segments) == len(train)
    assert [tok.decode(s[:-1].tolist()) for s in segments[::97]] == train[::97]


def test_ranks_share_an_epoch_disjointly(many_shards: PreparedData) -> None:
    prep, seq = many_shards, 64
    full = TokenWindows(prep.dir, "train", seq)
    ranks = [TokenWindows(prep.dir, "train", seq, rank=r, world_size=3) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == full.num_windows // 3
    for r, ds in enumerate(ranks):
        assert torch.equal(ds[5], full[r + 3 * 5])
    # One epoch: all ranks' shuffled sequences are distinct windows, and cover the corpus.
    seen = {tuple(ds.shuffled(7, 0, i).tolist()) for ds in ranks for i in range(len(ds))}
    assert len(seen) >= 0.99 * 3 * len(ranks[0])
    order = [full.shuffled(7, 0, i) for i in range(len(full))]
    assert {tuple(x.tolist()) for x in order} == {tuple(full[i].tolist()) for i in range(len(full))}
    # The order depends on seed and epoch, walks shard by shard, and survives a reopen (resume).
    assert not torch.equal(
        torch.stack(order[:8]), torch.stack([full.shuffled(8, 0, i) for i in range(8)])
    )
    assert not torch.equal(
        torch.stack(order[:8]), torch.stack([full.shuffled(7, 1, i) for i in range(8)])
    )
    reopened = TokenWindows(prep.dir, "train", seq)
    assert all(torch.equal(reopened.shuffled(7, 0, i), order[i]) for i in range(0, len(full), 37))
    with pytest.raises(ValueError, match="rank"):
        TokenWindows(prep.dir, "train", seq, rank=2, world_size=2)


def test_sampler_crosses_shards_and_resumes_exactly(many_shards: PreparedData) -> None:
    from trainers.components import BatchSampler

    ds = TokenWindows(many_shards.dir, "train", 64, rank=1, world_size=2)
    steps = 2 * len(ds) // 4 + 3  # past an epoch boundary, through every shard
    run = BatchSampler(ds, 4, seed=3)
    straight = [run.batch(m) for m in range(steps)]
    resumed = BatchSampler(TokenWindows(many_shards.dir, "train", 64, 1, 2), 4, seed=3)
    assert all(torch.equal(resumed.batch(m), straight[m]) for m in range(steps // 2, steps))
    epoch0 = torch.cat(straight[: len(ds) // 4])
    assert len({tuple(r.tolist()) for r in epoch0}) >= 0.99 * len(epoch0)  # no repeats


def test_weighted_mix_of_sources(many_shards: PreparedData, tmp_path: Path) -> None:
    """data.mix: each step's sequences come from the sources in proportion to the weights,
    each source in its own shuffled order, and the stream is a pure function of the seed."""
    (tmp_path / "b.txt").write_text(_synthetic_text(600, seed=5))
    tok = many_shards.tokenizer_path  # one tokenizer for both sources
    b = prepare_data(
        DataConfig(
            source=str(tmp_path / "b.txt"),
            tokenizer=tok,
            cache_dir=str(tmp_path),
            seq_len=64,
            val_fraction=0.3,
        )
    )
    cfg = DataConfig(mix={many_shards.dir: 3.0, b.dir: 1.0}, tokenizer=tok, seq_len=64)
    mix = prepare_data(cfg)
    assert mix.folders() == {many_shards.dir: 3.0, b.dir: 1.0}
    ds = open_windows(mix.folders(), "train", 64, rank=0, world_size=2)
    parts = ds.parts
    assert len(ds) == len(parts[0]) + len(parts[1])
    sources = [ds._slot(11, p)[0] for p in range(3000)]
    for block in range(3):  # exactly the weights' share in every block of 1,000
        assert sources[block * 1000 : (block + 1) * 1000].count(0) == 750
    # Source b is small for its weight: its own epochs repeat, in its own shuffled order.
    b_seqs = [ds.shuffled(11, 0, p) for p in range(3000) if sources[p] == 1]
    n_b = len(parts[1])
    assert len(b_seqs) > n_b
    expect = [parts[1].shuffled(11, k // n_b, k % n_b) for k in range(len(b_seqs))]
    assert all(torch.equal(x, y) for x, y in zip(b_seqs, expect))
    again = open_windows(mix.folders(), "train", 64, rank=0, world_size=2)
    assert all(torch.equal(again.shuffled(11, 1, i), ds.shuffled(11, 1, i)) for i in range(50))
    with pytest.raises(ConfigError, match="tokenizer: a mix of raw sources"):
        prepare_data(DataConfig(mix={str(tmp_path / "b.txt"): 1, "default": 1}))
    with pytest.raises(ConfigError, match="source: leave it unset"):
        validate(DataConfig, {"source": "x", "mix": {"a": 1}})
    with pytest.raises(ConfigError, match="mix: give sources"):
        validate(DataConfig, {"mix": {"a": 0}})


# --------------------------------------------------------------------------- split and cache


def test_split_is_deterministic_and_disjoint(
    small_default: tuple[DataConfig, object], tmp_path: Path
) -> None:
    cfg, prep = small_default
    again = prepare_data(cfg.model_copy(update={"cache_dir": str(tmp_path)}))
    assert again.dir != prep.dir  # really recomputed in a fresh cache
    for split in ("train", "val"):
        assert np.array_equal(_split_tokens(prep, split), _split_tokens(again, split))
    train, val = split_documents(load_documents(cfg), cfg.val_fraction)
    assert val and train
    assert not set(val) & set(train)
    assert split_documents(load_documents(cfg), cfg.val_fraction) == (train, val)


def test_cache_reuse_does_not_retokenize(
    small_default: tuple[DataConfig, object], monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg, prep = small_default
    files = [Path(prep.dir) / "manifest.json", Path(prep.tokenizer_path)]
    mtimes = [f.stat().st_mtime_ns for f in files]

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("cache miss: this should not run")

    monkeypatch.setattr(prep_mod, "tokenize_unit", fail)
    monkeypatch.setattr(data_mod, "iter_documents", fail)
    monkeypatch.setattr(tok_mod, "train_bpe", fail)
    assert prepare_data(cfg) == prep
    assert [f.stat().st_mtime_ns for f in files] == mtimes
    tok, _ = build_tokenizer(cfg)
    assert tok.get_vocab_size() == 512
    # The prepared folder is itself a source: `mor data prepare` output, used as it is.
    assert prepare_data(DataConfig(source=str(prep.dir), seq_len=64)) == prep


def test_killed_preparation_resumes_from_finished_units(tmp_path: Path) -> None:
    """`mor data prepare` SIGKILLed mid-way: the rerun keeps every finished unit's shards
    (same inode and mtime), leaves no half-written file visible, and ends equal to a clean
    preparation."""
    (tmp_path / "corpus.txt").write_text(_synthetic_text(4000))
    args = [
        str(tmp_path / "corpus.txt"),
        "vocab_size=300",
        "unit_bytes=65536",
        "shard_tokens=2048",
        "prepare_workers=1",
        f"cache_dir={tmp_path / 'c'}",
    ]
    cmd = [MOR, "data", "prepare", *args, "--out"]
    proc = subprocess.Popen([*cmd, str(tmp_path / "out")], stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # one progress line per finished unit
        if "unit 2/" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.wait()
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in (tmp_path / "out").rglob("*.npy")}
    assert before and not (tmp_path / "out" / "manifest.json").exists()
    subprocess.run([*cmd, str(tmp_path / "out")], check=True, capture_output=True)
    subprocess.run([*cmd, str(tmp_path / "clean")], check=True, capture_output=True)
    for p, stamp in before.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp  # never rewritten
    resumed = PreparedData.load(tmp_path / "out")
    clean = PreparedData.load(tmp_path / "clean")
    assert resumed.shards == clean.shards and len(clean.shards["train"]) > 5
    for split in ("train", "val"):
        assert np.array_equal(_split_tokens(resumed, split), _split_tokens(clean, split))
    assert not list((tmp_path / "out").rglob(".tmp-*"))


def test_changed_file_invalidates_cache(txt_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(txt_corpus), cache_dir=str(tmp_path / "c"), vocab_size=300)
    first = prepare_data(cfg)
    with open(txt_corpus, "a") as f:
        f.write("\n" + _synthetic_text(50, seed=1))
    second = prepare_data(cfg)
    assert second.dir != first.dir
    assert second.num_train_tokens + second.num_val_tokens > (
        first.num_train_tokens + first.num_val_tokens
    )


def test_cache_dir_defaults_to_env(
    txt_corpus: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "env-cache"))
    prep = prepare_data(DataConfig(source=str(txt_corpus), vocab_size=300))
    assert Path(prep.dir).is_relative_to(tmp_path / "env-cache")


def test_out_folder_of_other_inputs_is_refused(txt_corpus: Path, tmp_path: Path) -> None:
    cfg = DataConfig(source=str(txt_corpus), cache_dir=str(tmp_path / "c"), vocab_size=300)
    prepare_data(cfg, out=tmp_path / "out")
    with pytest.raises(ConfigError, match=r"out: .* different inputs"):
        prepare_data(cfg.model_copy(update={"val_fraction": 0.1}), out=tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match=r"out: .* not empty"):
        prepare_data(cfg, out=tmp_path / "full")


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


def test_compressed_jsonl_and_undecodable_input(tmp_path: Path) -> None:
    import gzip

    import pyarrow as pa

    rows = [{"text": f"line {i} of a compressed corpus. " * 4} for i in range(30)]
    body = "\n".join(json.dumps(r) for r in rows).encode()
    (tmp_path / "a.jsonl.gz").write_bytes(gzip.compress(body[: len(body) // 2]))
    with pa.CompressedOutputStream(str(tmp_path / "b.jsonl.zst"), "zstd") as f:
        f.write(body[len(body) // 2 :])
    cfg = DataConfig(source=str(tmp_path), cache_dir=str(tmp_path / "c"))
    # The two files split one line in the middle: each half is undecodable JSON, skipped.
    docs = load_documents(cfg)
    assert docs[:3] == [r["text"] for r in rows[:3]] and len(docs) == len(rows) - 1
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "fine"}\n\xff\xfe{"text": 1}\n{"n": 2}\n')
    one = DataConfig(source=str(tmp_path / "bad.jsonl"), cache_dir=str(tmp_path / "c"))
    skips = SkipCounts()
    assert list(data_mod.iter_documents(one, skips)) == ["fine"]
    assert skips.undecodable == 1 and skips.missing_field == 1
    with pytest.raises(ConfigError, match=r"decode_errors: .*bad\.jsonl line 2"):
        load_documents(one.model_copy(update={"decode_errors": "fail"}))
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    latin = DataConfig(source=str(tmp_path / "latin.txt"), decode_errors="fail")
    with pytest.raises(ConfigError, match=r"latin\.txt is not UTF-8 near byte 3"):
        load_documents(latin)


def test_missing_text_column_names_the_columns(tmp_path: Path) -> None:
    (tmp_path / "a.jsonl").write_text('{"body": "x", "id": 1}\n{"body": "y", "id": 2}\n')
    cfg = DataConfig(source=str(tmp_path / "a.jsonl"), cache_dir=str(tmp_path / "c"))
    with pytest.raises(ConfigError, match=r"text_field: 'text' .* columns: \['body', 'id'\]"):
        prepare_data(cfg)


def test_pathological_documents_cost_bounded_time(tmp_path: Path) -> None:
    """No newline, no space: cut into bounded pieces, so the BPE and the hash split work."""
    rng = random.Random(0)
    blob = "".join(rng.choices("abcdefghij", k=1_000_000)).encode()  # 1 MB, one "word"
    (tmp_path / "blob.txt").write_bytes(blob)
    (tmp_path / "blob.jsonl").write_text(json.dumps({"text": blob.decode()}) + "\n")
    for name in ("blob.txt", "blob.jsonl"):
        cfg = DataConfig(source=str(tmp_path / name), max_document_chars=20_000)
        docs = load_documents(cfg)
        assert "".join(docs) == blob.decode() and max(map(len, docs)) <= 20_000
    prep = prepare_data(
        DataConfig(source=str(tmp_path / "blob.txt"), vocab_size=300, cache_dir=str(tmp_path))
    )
    assert prep.num_train_tokens > 0 and prep.num_val_tokens > 0


# --------------------------------------------------------------------------- real corpora


def test_tinyshakespeare_smollm2(tmp_path: Path) -> None:
    _need_shared()
    source = CORPUS / "tinyshakespeare" / "input.txt"
    cfg = DataConfig(source=str(source), tokenizer=str(SMOLLM2), cache_dir=str(tmp_path))
    prep = prepare_data(cfg)
    assert prep.vocab_size == 49152 and prep.eos_id == 0
    train, val = _split_tokens(prep, "train"), _split_tokens(prep, "val")
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


def test_ray_data_stage_equals_one_process(tmp_path: Path) -> None:
    """Several units on the Ray Data pipeline (one task per CPU) give the same shards, byte
    for byte, as one process: a unit's shards depend on nothing but the unit."""
    _need_shared()
    source = str(CORPUS / "gutenberg_nltk" / "[bc]*.txt")
    # As the README types it (on Ray: a fresh local cluster, one task per CPU).
    args = [
        source,
        "--tokenizer",
        str(SMOLLM2),
        "--out",
        str(tmp_path / "ray"),
        "unit_bytes=524288",
    ]
    done = subprocess.run([MOR, "data", "prepare", *args], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"mor train data.source={tmp_path / 'ray'}" in done.stdout
    parallel = PreparedData.load(tmp_path / "ray")
    cfg = DataConfig(source=source, tokenizer=str(SMOLLM2))
    inline = prepare_data(cfg.model_copy(update={"prepare_workers": 1}), out=tmp_path / "one")
    assert parallel.vocab_size == 49152 and parallel.num_train_tokens > 250_000
    assert len(parallel.shards["train"]) >= 3 and parallel.shards == inline.shards
    for s in parallel.shards["train"] + parallel.shards["val"]:
        a, b = Path(parallel.dir) / s["file"], Path(inline.dir) / s["file"]
        assert a.read_bytes() == b.read_bytes()
    assert parallel.skipped == inline.skipped and parallel.skipped["undecodable"] > 0


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
    assert _split_tokens(prep, "train")[-1] == 50256


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
        with pytest.raises(ConfigError, match=r"source: unsupported file type '\.csv'"):
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
