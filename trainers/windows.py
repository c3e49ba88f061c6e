"""Training sequences from token shards: memory-mapped, rank-sharded, shuffled shard by shard.

A split's sequences are the non-overlapping windows ``shard[j*seq_len : (j+1)*seq_len]`` of
each shard (each shard's short tail is dropped). An epoch orders them by a permutation of the
shards, then a permutation of each shard's windows, both drawn from (seed, epoch): the state is
one shard's permutation, so memory does not grow with the corpus, and consecutive steps read
one shard at a time (sequential reads, local or streamed). Position p of that order belongs to
rank p mod world_size; all ranks together consume positions 0, 1, 2, ... So the batch of step
m is a pure function of (seed, m): resuming at step m continues at the exact next sequence.
"""

from __future__ import annotations

import bisect
import operator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from core.storage import Location, local_cache_root
from trainers.data import PreparedData

__all__ = ["MixedWindows", "TokenWindows", "open_windows"]


def _shard_cache() -> Path:
    """Where shards streamed from object storage land on this node."""
    return local_cache_root() / "shards"


class TokenWindows(torch.utils.data.Dataset):
    """Rank ``rank``'s sequences of one split of a prepared folder, as LongTensors [seq_len]
    that serve as inputs and labels (the model shifts internally).

    ``ds[i]`` is the rank's i-th sequence in corpus order (validation); ``ds.shuffled(seed,
    epoch, i)`` its i-th in the epoch's shuffled order (training). Every rank gets
    ``windows // world_size`` sequences, so DDP ranks take equal step counts."""

    def __init__(
        self, folder: str | Path, split: str, seq_len: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (got {seq_len})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size), got {rank} of {world_size}")
        self.folder = Location.parse(folder)
        data = PreparedData.load(self.folder)
        self.seq_len, self.split = seq_len, split
        self.rank, self.world_size = rank, world_size
        self.files = [s["file"] for s in data.shards[split]]
        self.counts = np.array([s["tokens"] // seq_len for s in data.shards[split]], np.int64)
        self.ends = np.cumsum(self.counts)
        self.num_windows = int(self.ends[-1]) if len(self.ends) else 0  # all ranks together
        self._len = self.num_windows // world_size
        self._maps: dict[int, np.ndarray] = {}
        self._order: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None
        self._perm: tuple[tuple[int, int, int], np.ndarray] | None = None

    def __len__(self) -> int:
        return self._len

    def _check(self, i: int) -> int:
        i = operator.index(i)
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError(f"index {i} out of range for {self._len} sequences")
        return i

    def _window(self, shard: int, j: int) -> torch.Tensor:
        tokens = self._maps.get(shard)
        if tokens is None:
            if len(self._maps) >= 4:  # keep a few open: the order walks shard by shard
                self._maps.pop(next(iter(self._maps)))
            tokens = np.load(self._local(shard), mmap_mode="r")
            self._maps[shard] = tokens
        window = tokens[j * self.seq_len : (j + 1) * self.seq_len]
        return torch.from_numpy(window.astype(np.int64))

    def _local(self, shard: int) -> Path:
        """A shard on local disk: itself, or a download from object storage (one shard is
        read at a time; copies of shards left behind are removed, so disk use is bounded)."""
        loc = self.folder.child(self.files[shard])
        if loc.is_local:
            return Path(loc.path)
        cache = _shard_cache() / f"{self.split}-rank{self.rank}"
        path = loc.local_copy(cache)
        for old in cache.glob("*.npy"):
            if old != path and old.name.split("-", 1)[1] not in self._open_names():
                old.unlink(missing_ok=True)  # an open memory map keeps its pages
        return path

    def _open_names(self) -> set[str]:
        return {self.files[k].rsplit("/", 1)[-1] for k in self._maps}

    def __getitem__(self, i: int) -> torch.Tensor:
        pos = self.rank + self._check(i) * self.world_size
        shard = int(np.searchsorted(self.ends, pos, side="right"))
        return self._window(shard, pos - (int(self.ends[shard - 1]) if shard else 0))

    def shuffled(self, seed: int, epoch: int, i: int) -> torch.Tensor:
        """The rank's i-th sequence of ``epoch`` in the (seed, epoch) order."""
        pos = self.rank + self._check(i) * self.world_size
        shards, ends = self._epoch_order(seed, epoch)
        k = bisect.bisect_right(ends, pos)
        shard = int(shards[k])
        j = pos - (int(ends[k - 1]) if k else 0)
        return self._window(shard, int(self._shard_perm(seed, epoch, shard)[j]))

    def _epoch_order(self, seed: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._order is None or self._order[0] != (seed, epoch):
            shards = np.random.default_rng([seed, epoch]).permutation(len(self.counts))
            self._order = ((seed, epoch), shards, np.cumsum(self.counts[shards]))
        return self._order[1], self._order[2]

    def _shard_perm(self, seed: int, epoch: int, shard: int) -> np.ndarray:
        key = (seed, epoch, shard)
        if self._perm is None or self._perm[0] != key:
            rng = np.random.default_rng([seed, epoch, shard, 1])
            self._perm = (key, rng.permutation(int(self.counts[shard])))
        return self._perm[1]

    def __getstate__(self) -> dict[str, Any]:
        # Pickled memmaps would copy whole shards into every DataLoader worker.
        state = dict(self.__dict__)
        state["_maps"] = {}
        return state


MIX_BLOCK = 1000
"""Positions per mixing block: each block holds every source's share (largest remainder)."""


class MixedWindows:
    """Sequences drawn from several prepared folders in proportion to their weights.

    The stream is cut into blocks of MIX_BLOCK positions; in each, source s owns its share of
    the slots, placed by a (seed, block) permutation, and its k-th slot overall is its k-th
    sequence (cycling through its own shuffled epochs: a small source with a large weight is
    repeated, a large one is subsampled). So the batch of step m is still a pure function of
    (seed, m), and ``len`` (one mixture epoch) is the sources' total."""

    def __init__(self, parts: list[TokenWindows], weights: list[float]) -> None:
        self.parts = parts
        total = sum(weights)
        raw = [w / total * MIX_BLOCK for w in weights]
        quotas = [int(r) for r in raw]
        by_remainder = sorted(range(len(raw)), key=lambda s: raw[s] - quotas[s], reverse=True)
        for s in by_remainder[: MIX_BLOCK - sum(quotas)]:
            quotas[s] += 1
        self.quotas = quotas
        self.slots = np.repeat(np.arange(len(parts)), quotas)  # block order, unshuffled
        self._len = sum(len(p) for p in parts)
        self._block: tuple[tuple[int, int], np.ndarray, np.ndarray] | None = None

    def __len__(self) -> int:
        return self._len

    def _slot(self, seed: int | None, pos: int) -> tuple[int, int]:
        """(source, its sequence number) of mixture position ``pos``."""
        block, j = divmod(pos, MIX_BLOCK)
        key = (-1 if seed is None else seed, block)
        if self._block is None or self._block[0] != key:
            slots = self.slots
            if seed is not None:
                slots = slots[np.random.default_rng([seed, block, 2]).permutation(MIX_BLOCK)]
            # Each slot's rank among its source's slots in this block.
            rank = np.zeros(MIX_BLOCK, np.int64)
            for s in range(len(self.parts)):
                mine = slots == s
                rank[mine] = np.arange(int(mine.sum()))
            self._block = (key, slots, rank)
        _, slots, rank = self._block
        source = int(slots[j])
        return source, block * self.quotas[source] + int(rank[j])

    def __getitem__(self, i: int) -> torch.Tensor:
        source, k = self._slot(None, i)
        part = self.parts[source]
        return part[k % len(part)]

    def shuffled(self, seed: int, epoch: int, i: int) -> torch.Tensor:
        source, k = self._slot(seed, epoch * self._len + i)
        part = self.parts[source]
        part_epoch, j = divmod(k, len(part))
        return part.shuffled(seed, part_epoch, j)


def open_windows(
    folders: dict[str, float], split: str, seq_len: int, rank: int = 0, world_size: int = 1
) -> TokenWindows | MixedWindows:
    """A rank's sequences of ``split``: one folder's, or a weighted mixture of several."""
    parts = [TokenWindows(f, split, seq_len, rank, world_size) for f in folders]
    if len(parts) == 1:
        return parts[0]
    return MixedWindows(parts, list(folders.values()))
