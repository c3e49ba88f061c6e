"""KV-cache storage that allocates what it holds (paper §2.3: recursion-wise caching).

With recursion-wise caching a site at recursion r holds only the tokens active at r, so a MoR
model's *valid* KV entries are (N_r + 1)/(2 N_r) of a vanilla model's (at the default
capacities). A dense [B, H_kv, S, hd] tensor per site does not turn that into saved memory: it
pads every row to the longest one and keeps a column for every step in which any row was
active. Two layouts here store valid entries only:

* ``KVCache`` (the model's incremental-decoding state) keeps each site as a ``PackedSite``
  between forwards: the valid entries, row after row, with their positions. A forward expands
  the sites it reads into a transient dense ``KVSite`` (attention needs one) and packs them again
  at its end (``KVCache.compact``); only packed sites are held between steps.
* ``KVPool`` (``mor.engine``'s storage) is a pool of per-token entries addressed by page tables
  (page size 1): one table per *stream* of tokens (pre/post layers: every token; recursion r:
  the tokens active at r), shared by the layers of that stream, like the per-sequence block
  tables of paged attention. Entries come from a free list and go back to it when a sequence
  finishes; the pool grows when the free list runs out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from mor.layers import KVSite


@dataclass
class PackedSite:
    """One site's valid entries only: entry e is row ``row[e]``'s next key/value."""

    k: Tensor  # [N, H_kv, hd]
    v: Tensor  # [N, H_kv, hd]
    pos: Tensor  # [N] long
    row: Tensor  # [N] long, non-decreasing
    counts: Tensor  # [B] long: entries per row
    width: int  # max(counts): the dense width

    @classmethod
    def pack(cls, site: KVSite) -> PackedSite:
        """Keep the entries attention can see (``valid``), in their order within each row."""
        row, t = site.valid.nonzero(as_tuple=True)
        counts = site.valid.sum(1)
        width = int(counts.max()) if counts.numel() else 0
        return cls(site.k[row, :, t], site.v[row, :, t], site.pos[row, t], row, counts, width)

    def columns(self) -> Tensor:
        """Each entry's index within its row."""
        starts = self.counts.cumsum(0) - self.counts
        return torch.arange(self.row.numel(), device=self.row.device) - starts[self.row]

    def dense(self) -> KVSite:
        """The site as a (transient) right-padded dense ``KVSite`` of width ``width``."""
        b, (h, hd) = self.counts.numel(), self.k.shape[1:]
        col = self.columns()
        k = self.k.new_zeros(b, h, self.width, hd)
        v = self.v.new_zeros(b, h, self.width, hd)
        k[self.row, :, col] = self.k
        v[self.row, :, col] = self.v
        pos = self.pos.new_zeros(b, self.width)
        pos[self.row, col] = self.pos
        valid = torch.zeros(b, self.width, dtype=torch.bool, device=self.k.device)
        valid[self.row, col] = True
        return KVSite(k, v, pos, valid)

    def num_valid(self) -> int:
        return self.row.numel()

    def nbytes(self) -> int:
        """Bytes allocated: keys, values and the index tensors."""
        ts = (self.k, self.v, self.pos, self.row, self.counts)
        return sum(t.numel() * t.element_size() for t in ts)


def as_site(site: KVSite | PackedSite | None) -> KVSite | None:
    """A dense ``KVSite`` for a layer call (packed sites are expanded, transiently)."""
    return site.dense() if isinstance(site, PackedSite) else site


def _entry_bytes(k: Tensor) -> int:
    """Bytes of one entry's key and value ([.., H_kv, S, hd] or [N, H_kv, hd] layouts)."""
    return 2 * k.shape[-1] * k.shape[1] * k.element_size()


@dataclass
class KVCache:
    """Incremental-decoding state: one site per attention site plus tokens seen per row.

    Sites are keyed ("pre", i), ("rec", r, j) and ("post", i). With recursion-wise caching a
    site at recursion r holds only the tokens active at r; with recursive sharing only r = 0
    sites exist and deeper recursions read them. Between forwards every site is a
    ``PackedSite`` (valid entries only); inside a forward the sites it has run are dense.
    """

    sites: dict[tuple, KVSite | PackedSite] = field(default_factory=dict)
    seen: Tensor | None = None  # [B] valid tokens already processed per row

    def compact(self) -> None:
        """Pack every dense site (the model calls this at the end of each forward)."""
        for key, site in self.sites.items():
            if isinstance(site, KVSite):
                self.sites[key] = PackedSite.pack(site)

    def num_bytes(self, valid_only: bool = True) -> int:
        """Bytes of keys and values attention can see (default), or every byte allocated for
        the sites now (keys, values, positions and index/validity tensors)."""
        total = 0
        for site in self.sites.values():
            if valid_only:
                total += _entry_bytes(site.k) * site.num_valid()
            elif isinstance(site, PackedSite):
                total += site.nbytes()
            else:
                ts = (site.k, site.v, site.pos, site.valid)
                total += sum(t.numel() * t.element_size() for t in ts)
        return total


class KVPool:
    """Per-token KV entries of ``layers`` layers that share page tables, for ``streams``
    streams × ``slots`` sequences (``mor.engine``: streams are the recursions, or the single
    every-token stream of the unique first/last layers).

    ``table[stream, slot, i]`` is the entry holding that sequence's i-th key at that stream;
    entry e of layer L is ``k[L, e]``. Only entries in use are held (plus free-list slack
    after a sequence finishes; the pool grows by ``grow`` of its size when it runs out).
    Tables and counters live on the host (they are small); keys and values on ``device``.
    """

    def __init__(
        self, layers: int, streams: int, slots: int, max_len: int, heads: int, head_dim: int,
        dtype: torch.dtype, device: torch.device, capacity: int = 0, grow: float = 0.0625,
    ) -> None:  # fmt: skip
        self.layers, self.max_len, self.grow = layers, max_len, grow
        self.shape, self.dtype, self.device = (heads, head_dim), dtype, device
        self.k = torch.zeros(layers, capacity, heads, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)
        # (a pool without layers, e.g. a model without unique first/last layers, needs no table)
        self.table = torch.zeros(streams, slots, max_len if layers else 0, dtype=torch.long)
        self.n = torch.zeros(streams, slots, dtype=torch.long)
        self.free = torch.arange(capacity - 1, -1, -1, dtype=torch.long)  # a stack: top last
        self.top = capacity  # free entries: free[:top]
        self.peak_capacity = capacity
        self.peak_used = 0  # the most entries in use at once

    @property
    def capacity(self) -> int:
        return self.k.shape[1]

    def _take(self, m: int) -> Tensor:
        if m > self.top:
            self._grow(m - self.top)
        self.top -= m
        self.peak_used = max(self.peak_used, self.capacity - self.top)
        return self.free[self.top : self.top + m].clone()

    def _grow(self, need: int) -> None:
        """Enlarge the pool by ``need`` entries or ``grow`` of its size, whichever is more."""
        old = self.capacity
        extra = max(need, math.ceil(old * self.grow))
        pad = torch.zeros(self.layers, extra, *self.shape, dtype=self.dtype, device=self.device)
        self.k, self.v = torch.cat([self.k, pad], 1), torch.cat([self.v, pad.clone()], 1)
        free = torch.empty(old + extra, dtype=torch.long)
        free[:extra] = torch.arange(old + extra - 1, old - 1, -1)
        free[extra : extra + self.top] = self.free[: self.top]
        self.free, self.top = free, self.top + extra
        self.peak_capacity = max(self.peak_capacity, self.capacity)

    def append(self, stream: Tensor, slot: Tensor) -> Tensor:
        """One new entry per (stream[i], slot[i]) (host long tensors); returns the entries."""
        at = self.n[stream, slot]
        if at.numel() and int(at.max()) >= self.max_len:
            raise RuntimeError(f"KV storage of max_len={self.max_len} entries is full")
        ids = self._take(stream.numel())
        self.table[stream, slot, at] = ids
        self.n[stream, slot] = at + 1
        return ids

    def fill(self, stream: int, slots: Tensor, row: Tensor, counts: Tensor) -> Tensor:
        """Entries for a packed site's entries (row ``row[e]`` → slot ``slots[row[e]]``), after
        the slots' earlier ones were released; returns the entries, in the packed order."""
        col = torch.arange(row.numel()) - (counts.cumsum(0) - counts)[row]
        ids = self._take(row.numel())
        self.table[stream, slots[row], col] = ids
        self.n[stream, slots] = counts
        return ids

    def write(self, layer: int, ids: Tensor, k: Tensor, v: Tensor) -> None:
        """Store keys/values [m, H_kv, hd] of ``layer`` at entries ``ids`` (on the device)."""
        self.k[layer].index_copy_(0, ids, k)
        self.v[layer].index_copy_(0, ids, v)

    def index(self, stream: Tensor, slot: Tensor) -> tuple[Tensor, Tensor]:
        """Entries [n, span] each row attends to and their mask [n, span] (on the host)."""
        lens = self.n[stream, slot]
        span = int(lens.max())
        return self.table[stream, slot, :span], torch.arange(span)[None, :] < lens[:, None]

    def read(self, layer: int, idx: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values [n, H_kv, span, hd] at entries ``idx`` [n, span] (on the device)."""
        n, span = idx.shape
        flat = idx.reshape(-1)
        k = self.k[layer].index_select(0, flat).view(n, span, *self.shape).transpose(1, 2)
        v = self.v[layer].index_select(0, flat).view(n, span, *self.shape).transpose(1, 2)
        return k, v

    def release(self, slot: int) -> None:
        """Return a finished sequence's entries to the free list."""
        for st in range(self.n.shape[0]):
            m = int(self.n[st, slot])
            if m:
                self.free[self.top : self.top + m] = self.table[st, slot, :m]
                self.top += m
        self.n[:, slot] = 0

    # ------------------------------------------------------------------ memory accounting
    def entry_bytes(self) -> int:
        """Bytes of one entry's keys and values over all layers of the pool."""
        return 2 * self.layers * self.shape[0] * self.shape[1] * self.k.element_size()

    def valid_bytes(self, slot: int | None = None, peak: bool = False) -> int:
        """Bytes of the entries in use now (one slot, or all), or at most at once (peak)."""
        if peak:
            return self.entry_bytes() * self.peak_used
        cols = slice(None) if slot is None else slot
        return self.entry_bytes() * int(self.n[:, cols].sum())

    def index_bytes(self) -> int:
        """The host-side page tables, counters and free list."""
        return sum(t.numel() * t.element_size() for t in (self.table, self.n, self.free))

    def allocated_bytes(self, peak: bool = False) -> int:
        """Keys/values allocated now (or at the pool's largest) plus the index tensors."""
        cap = self.peak_capacity if peak else self.capacity
        return self.entry_bytes() * cap + self.index_bytes()
