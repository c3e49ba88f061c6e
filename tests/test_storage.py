"""Object storage (core.storage) against a real S3-compatible server: moto's standalone server,
started and stopped here on 127.0.0.1, reached through the standard AWS environment variables.
Prepared data written to and trained on from ``s3://`` without any shared disk."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from core.storage import Location, local_mirror
from mor.overrides import ConfigError
from trainers.data import DataConfig, prepare_data
from trainers.windows import TokenWindows, _shard_cache


def test_locations_join_as_strings_never_paths(s3: str) -> None:
    """The ``Path("s3://b/k")`` bug class: children of a URI stay URIs, on the server."""
    root = Location.parse(f"{s3}/prefix/")
    leaf = root.child("runs", "name", "a.json")
    assert leaf.uri == f"{s3}/prefix/runs/name/a.json" and not leaf.is_local
    assert not leaf.exists() and root.names() == []
    leaf.write_text('{"ok": 1}')
    assert leaf.is_file() and leaf.read_text() == '{"ok": 1}'
    assert root.child("runs").names() == ["name"]
    local = Location.parse("~/x").child("y")
    assert local.is_local and local.uri == os.path.expanduser("~/x/y")


def test_prepare_to_s3_and_read_back(s3: str, tmp_path: Path) -> None:
    from test_data import _synthetic_text

    (tmp_path / "corpus.txt").write_text(_synthetic_text(1500))
    cfg = DataConfig(
        source=str(tmp_path / "corpus.txt"), vocab_size=300, cache_dir=str(tmp_path / "c"),
        unit_bytes=1 << 17, shard_tokens=8192, seq_len=64, prepare_workers=1, val_fraction=0.2,
    )  # fmt: skip
    remote = prepare_data(cfg, out=f"{s3}/prepared")
    local = prepare_data(cfg, out=tmp_path / "local")
    assert remote.dir == f"{s3}/prepared" and remote.shards == local.shards
    names = Location.parse(remote.dir).child("train").names()
    assert len(names) == len(remote.shards["train"]) > 2  # objects in the bucket
    # The prepared URI is a source: a run reads its manifest and streams its shards.
    again = prepare_data(DataConfig(source=remote.dir, seq_len=64))
    assert again == remote
    for split in ("train", "val"):
        a = TokenWindows(remote.dir, split, 64, rank=1, world_size=2)
        b = TokenWindows(local.dir, split, 64, rank=1, world_size=2)
        assert len(a) == len(b) > 0
        for i in range(0, len(a), max(1, len(a) // 20)):
            assert torch.equal(a.shuffled(3, 0, i), b.shuffled(3, 0, i))
            assert torch.equal(a[i], b[i])
    # Downloaded shards do not pile up: at most the few open ones stay on local disk.
    kept = list((_shard_cache() / "train-rank1").glob("*.npy"))
    assert 0 < len(kept) <= 4
    assert np.load(kept[0]).dtype == np.uint16


def test_folders_copy_and_download(s3: str, tmp_path: Path, monkeypatch) -> None:
    """An export-like folder copied into the bucket (as the driver copies the final
    checkpoint's export), then read back on 'another node' through its local mirror."""
    import pyarrow.fs as pafs

    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "cache"))
    src = tmp_path / "ckpt" / "export"
    (src / "sub").mkdir(parents=True)
    (src / "config.json").write_text("{}")
    (src / "sub" / "model.pt").write_bytes(os.urandom(3 << 20))
    dest = Location.parse(f"{s3}/store/runs/r/export")
    dest.child("stale.txt").write_text("from an earlier attempt")
    dest.copy_tree_from(pafs.LocalFileSystem(), str(src))
    assert dest.names() == ["config.json", "sub"]  # replaced, not merged
    local = dest.local_folder()
    assert local == local_mirror(dest.uri) and str(local).startswith(str(tmp_path / "cache"))
    assert (local / "sub" / "model.pt").read_bytes() == (src / "sub" / "model.pt").read_bytes()
    # A rerun rewrites the weights at the same size: the next read gets the new ones.
    time.sleep(1.1)  # object stores keep modification times to the second
    (src / "sub" / "model.pt").write_bytes(os.urandom(3 << 20))
    dest.copy_tree_from(pafs.LocalFileSystem(), str(src))
    again = dest.local_folder()
    assert (again / "sub" / "model.pt").read_bytes() == (src / "sub" / "model.pt").read_bytes()
    assert Location.parse(src).local_folder() == src  # a local folder is its own copy
    with pytest.raises(FileNotFoundError):
        Location.parse(f"{s3}/store/nothing").local_folder()


def test_storage_uri_errors_are_clear_before_anything_runs(s3: str, tmp_path: Path) -> None:
    """A bucket that does not exist, and a URI storage without a tracking server: config errors
    naming the field, in seconds, with no MLflow run created and no Ray started."""
    import ray

    from trainers.config import load_train_config
    from trainers.launcher import plan_run

    base = [
        "data.source=default", "data.max_documents=200", "model.preset=micro",
        f"data.cache_dir={tmp_path / 'cache'}", "budget.steps=1",
    ]  # fmt: skip
    cfg = load_train_config(None, [*base, "storage_path=s3://no-such-bucket/x"])
    with pytest.raises(ConfigError, match=r"storage_path: s3://no-such-bucket/x is not writable"):
        plan_run(cfg)
    cfg = load_train_config(None, [*base, f"storage_path={s3}/runs-here"])
    assert cfg.storage_path == f"{s3}/runs-here"
    with pytest.raises(ConfigError, match=r"tracking\.uri: storage_path .* is an object store"):
        plan_run(cfg)
    relative = load_train_config(None, [*base, "storage_path=outputs"])
    assert relative.storage_path == os.path.abspath("outputs")  # every process sees one path
    assert not ray.is_initialized()


def test_sweep_bookkeeping_follows_the_sweep_to_another_machine(
    s3: str, tmp_path: Path, monkeypatch
) -> None:
    """A driver's bookkeeping on object storage is kept beside the sweep's record as it
    changes; a driver on a machine with an empty cache restores it; a new search forgets it.
    On a local disk the bookkeeping folder is the record itself: nothing is copied."""
    from sweeps.store import SweepStore

    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "machine-a"))
    store = SweepStore.of(f"{s3}/sweeps-store", "kept")
    store.state_dir.mkdir(parents=True)
    (store.state_dir / "asha_rungs.json").write_text("[[1.0, {}]]")
    store.keep(store.state_dir / "asha_rungs.json")
    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "machine-b"))
    assert not store.state_dir.exists()
    store.restore()
    assert (store.state_dir / "asha_rungs.json").read_text() == "[[1.0, {}]]"
    store.forget()
    assert store.home.child("state").names() == []
    local = SweepStore.of(str(tmp_path / "local"), "kept")
    assert local.state_dir == tmp_path / "local" / "sweeps" / "kept"
    local.state_dir.mkdir(parents=True)
    (local.state_dir / "stopped.jsonl").write_text("{}\n")
    local.keep(local.state_dir / "stopped.jsonl")
    assert os.listdir(local.home.path) == ["stopped.jsonl"]
