"""Object storage (core.storage) against a real S3-compatible server: moto's standalone server,
started and stopped here on 127.0.0.1, reached through the standard AWS environment variables.
Prepared data written to and trained on from ``s3://`` without any shared disk."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from core.storage import Location
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
