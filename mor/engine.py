"""Inference engine for MoR: continuous depth-wise batching with early exit (arXiv 2507.10524).

The paper's throughput claim (Fig. 4a; appendix on depth-wise batching; after Bae et al. 2024,
*Relaxed Recursive Transformers*) rests on recursions sharing weights: tokens at *different*
depths can go through the same layer call. With ``max_slots`` sequences in flight, each step
1. admits queued requests into free slots (a padded prefill forward of the model; its
   ``KVCache`` is copied into per-slot storage);
2. embeds each fed-back token, runs the unique first layer(s) and routes it with the model's
   inference rule, ``Router.decide`` (the same call ``MoRModel.forward`` makes in eval());
3. runs the shared recursion block ONCE over every token at any recursion (sequence A's token
   at recursion 2 and B's at recursion 1 share each layer call; with sequence sharing, position
   j of different recursions may be different unique layers: one call per unique layer);
4. sends tokens that stop (early exit: no work at deeper recursions) through the unique last
   layer(s) and the LM head, emits greedy tokens, and frees finished slots for the next step.
Each slot owns keys/values per attention site: unique layers, and per block position j one site
per recursion (recursion-wise: only tokens active at r) or recursion 0's only (recursive KV
sharing, §2.3: deeper recursions read it and project no keys). A token at recursion r attends
to its own sequence's site (r, j), so the tokens equal step-by-step ``mor.generation.generate``.
Keys/values live in ``mor.kvcache.KVPool``s (per-token entries from a free list, addressed by
page tables shared by the layers of a stream): a sequence holds only the entries it has, so a
recursion's memory is what it caches, and what a step reads and writes is planned once per
stage (``_Plan``) for all the layers of that stage, not per layer call.
``mor.generation.naive_generate`` is the baseline: static batches
through the model's own forward, which runs recursion after recursion over shrinking (gathered)
token sets.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from mor.kvcache import KVCache, KVPool, PackedSite
from mor.layers import apply_rotary
from mor.model import MoRModel
from mor.routing import Memo

_IDLE, _ENTRY, _REC, _EXIT = 0, 1, 2, 3


@dataclass
class EngineStats:
    """Counters of one engine's work (decode = tokens fed back after the prefill)."""

    steps: int = 0
    """Engine steps (each runs the shared block at most once per layer position)."""
    prefill_calls: int = 0
    prefill_tokens: int = 0
    decode_tokens: int = 0
    """Tokens fed through the model one at a time (every generated token but the last)."""
    generated_tokens: int = 0
    layer_calls: dict[str, int] = field(default_factory=lambda: {"pre": 0, "rec": 0, "post": 0})
    """Decoder-layer calls during decoding, by kind (unique first/last layers, shared block)."""
    rec_rows: int = 0
    """Token-rows processed by shared-block layer calls (= Σ_tokens depth × block depth)."""
    mixed_depth_passes: int = 0
    """Shared-block passes that batched tokens at two or more different recursions."""
    refills: int = 0
    """Requests admitted while other slots were mid-sequence (continuous batching)."""
    tokens_per_recursion: list[int] = field(default_factory=list)
    """Decode tokens that ran recursion r."""
    tokens_per_depth: list[int] = field(default_factory=list)
    """Decode tokens whose final depth is d (0..N_r)."""
    prefill_active: list[float] = field(default_factory=list)
    """Prefill tokens that ran recursion r."""
    kv_bytes_finished: int = 0
    """Valid KV-cache bytes of each sequence when it finished, summed."""
    wall_s: float = 0.0

    def active_fractions(self, include_prefill: bool = True) -> list[float]:
        """Fraction of tokens (prefill + decode, or decode only) that ran each recursion."""
        w = 1.0 if include_prefill else 0.0
        n = self.decode_tokens + w * self.prefill_tokens
        act = [d + w * p for d, p in zip(self.tokens_per_recursion, self.prefill_active)]
        return [a / max(1.0, n) for a in act]

    def mean_depth(self) -> float:
        n = sum(self.tokens_per_depth)
        return sum(d * c for d, c in enumerate(self.tokens_per_depth)) / max(1, n)


@dataclass
class _Request:
    rid: int
    prompt: list[int]
    max_new: int
    out: list[int] = field(default_factory=list)
    depths: list[int] = field(default_factory=list)
    logits: list[Tensor] = field(default_factory=list)


@dataclass
class _Plan:
    """What the rows of a stage's layer calls read and write, planned once per step."""

    idx: Tensor  # [n, span] pool entries each row attends to (device)
    mask: Tensor  # [n, 1, 1, span] bool: entries that exist (device)
    ids: Tensor  # [n] the entry each row writes (device; meaningless where it does not write)
    writes: Tensor | None  # [n] bool, host: rows that project keys (None: every row)

    def __post_init__(self) -> None:
        w = self.writes
        self.w_rows = None if w is None else w.nonzero().squeeze(1).to(self.ids.device)
        self.w_ids = self.ids if w is None else self.ids[self.w_rows]
        self.any_write = w is None or bool(w.any())

    def subset(self, rows: Tensor) -> _Plan:
        """The plan of some rows (host indices): sequence sharing's per-layer groups."""
        d = rows.to(self.ids.device)
        w = None if self.writes is None else self.writes[rows]
        return _Plan(self.idx[d], self.mask[d], self.ids[d], w)


class DepthwiseBatchingEngine:
    """Greedy batched generation for an MoR model with continuous depth-wise batching.

    ``submit`` requests, then ``run()`` (the model is put in ``eval()`` mode); ``stats`` says
    what was computed. ``max_depth`` caps the recursions as in ``MoRModel.forward``.
    ``record_logits`` keeps each emitted token's logits (for tests).
    """

    def __init__(
        self, model: MoRModel, max_slots: int = 8, eos_id: int | None = None,
        max_len: int | None = None, max_depth: int | None = None, record_logits: bool = False,
    ) -> None:  # fmt: skip
        cfg = model.cfg
        if max_slots < 1:
            raise ValueError(f"max_slots: must be >= 1, got {max_slots}")
        if max_depth is not None and not 1 <= max_depth <= cfg.num_recursions:
            raise ValueError(f"max_depth: must be in 1..{cfg.num_recursions}, got {max_depth}")
        self.model, self.cfg = model.eval(), cfg
        self.max_slots, self.eos_id, self.record_logits = max_slots, eos_id, record_logits
        self.max_len, self.max_depth = max_len or cfg.max_seq_len, max_depth
        self.n_rec = max_depth or cfg.num_recursions
        self.device, self.dtype = model.embed.weight.device, model.embed.weight.dtype
        # fp32/fp64: fused norms and a roll-based rotation (the same arithmetic as the model's
        # modules, in fewer operator calls: per-call overhead dominates a decode step). Other
        # dtypes (bf16: the model rotates in fp32) go through the model's own functions.
        self.fast = self.dtype in (torch.float32, torch.float64)
        self.shared_kv = cfg.kv_cache == "shared"
        self.base = cfg.recursion_depth
        self.layer_of = [cfg.recursion_layers(r) for r in range(cfg.num_recursions)]
        n_sites = 1 if self.shared_kv else cfg.num_recursions
        self.n_pre, self.n_post = cfg.num_prefix_layers, cfg.num_suffix_layers
        # The unique first/last layers cache every token (one stream); the recursion block
        # one stream per recursion (recursion-wise) or recursion 0's only (shared).
        self.outer = self._pool(self.n_pre + self.n_post, 1)
        self.rec = self._pool(self.base, n_sites)
        self.outer_ids = torch.zeros(max_slots, dtype=torch.long)  # each token's outer entry
        self.queue: deque[_Request] = deque()
        self.requests: dict[int, _Request] = {}
        self.results: dict[int, list[int]] = {}
        s = max_slots
        self.slot_req: list[_Request | None] = [None] * s
        self.stage, self.r = [_IDLE] * s, [0] * s
        self.token, self.pos = [0] * s, [0] * s
        self.h = torch.zeros(s, cfg.hidden_size, dtype=self.dtype, device=self.device)
        # Per slot: the gate of the token's current recursion (if its router gates) and the
        # router's memo (``Router.decide`` state, e.g. token-choice's depth), kept across steps.
        self.gate = torch.ones(s, dtype=self.dtype, device=self.device)
        self.gated = [False] * s
        self.memo: Memo = {}
        self.rope = torch.zeros(2, s, 1, 1, cfg.head_dim, dtype=self.dtype, device=self.device)
        n_r = cfg.num_recursions
        self.stats = EngineStats(tokens_per_recursion=[0] * n_r, prefill_active=[0.0] * n_r,
                                 tokens_per_depth=[0] * (n_r + 1))  # fmt: skip
        self._next_id = 0

    def _pool(self, layers: int, streams: int) -> KVPool:
        c = self.cfg
        return KVPool(layers, streams, self.max_slots, self.max_len, c.num_kv_heads, c.head_dim,
                      self.dtype, self.device)  # fmt: skip

    # ------------------------------------------------------------------ public API
    def submit(self, prompt_ids: list[int], max_new_tokens: int) -> int:
        """Queue a request; returns its id (the key of ``run()``'s result)."""
        if not prompt_ids:
            raise ValueError("prompt_ids: needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be >= 1, got {max_new_tokens}")
        if len(prompt_ids) + max_new_tokens > self.max_len:
            raise ValueError(
                f"max_new_tokens: prompt ({len(prompt_ids)}) + {max_new_tokens} new tokens "
                f"exceed max_len={self.max_len}"
            )
        req = _Request(self._next_id, list(prompt_ids), int(max_new_tokens))
        self._next_id += 1
        self.queue.append(req)
        self.requests[req.rid] = req
        return req.rid

    @torch.no_grad()
    def run(self) -> dict[int, list[int]]:
        """Decode until the queue is empty and every slot is free; request id → new tokens."""
        t0 = time.perf_counter()
        while self.queue or any(r is not None for r in self.slot_req):
            self.step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stats.wall_s += time.perf_counter() - t0
        return {rid: self.results[rid] for rid in sorted(self.results)}

    def depths(self, rid: int) -> list[int]:
        """Recursions each fed-back token of request ``rid`` ran (decode tokens, in order)."""
        return self.requests[rid].depths

    def logits(self, rid: int) -> Tensor:
        """Logits behind each emitted token of ``rid`` (needs ``record_logits=True``)."""
        return torch.stack(self.requests[rid].logits)

    def kv_bytes(self, slot: int | None = None, peak: bool = False) -> int:
        """Valid KV-cache bytes held now (one slot, or all), or at most at once (per pool)."""
        return self.outer.valid_bytes(slot, peak) + self.rec.valid_bytes(slot, peak)

    def kv_allocated_bytes(self, peak: bool = True) -> int:
        """KV storage allocated (at its largest, or now): the pools' keys/values (entries in
        use plus free-list slack) and their page tables."""
        return self.outer.allocated_bytes(peak) + self.rec.allocated_bytes(peak)

    @torch.no_grad()
    def step(self) -> None:
        """One engine step: admit, enter, one shared-block pass, exit."""
        self._admit()
        for stage, fn in ((_ENTRY, self._enter), (_REC, self._recurse), (_EXIT, self._exit)):
            slots = [s for s in range(self.max_slots) if self.stage[s] == stage]
            if slots:
                fn(slots)
        self.stats.steps += 1

    # ------------------------------------------------------------------ admission / prefill
    def _admit(self) -> None:
        while self.queue:
            free = [s for s in range(self.max_slots) if self.slot_req[s] is None]
            if not free:
                return
            batch = [(s, self.queue.popleft()) for s in free[: len(self.queue)]]
            if len(free) < self.max_slots:
                self.stats.refills += len(batch)
            self._prefill(batch)

    def _prefill(self, batch: list[tuple[int, _Request]]) -> None:
        """One right-padded forward of the model over the new prompts; copy its caches."""
        lens = [len(req.prompt) for _, req in batch]
        ids = torch.zeros(len(batch), max(lens), dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, (_, req) in enumerate(batch):
            ids[b, : lens[b]] = torch.tensor(req.prompt)
            mask[b, : lens[b]] = 1
        cache = KVCache()
        out = self.model(
            ids.to(self.device), mask.to(self.device), cache=cache, max_depth=self.max_depth
        )
        st = self.stats
        st.prefill_calls += 1
        st.prefill_tokens += sum(lens)
        if out.stats is not None:
            for r, f in enumerate(out.stats.active_fraction):
                st.prefill_active[r] += f * sum(lens)
        else:  # vanilla: every token runs the single "recursion"
            st.prefill_active[0] += sum(lens)
        self._copy_cache(cache, torch.tensor([s for s, _ in batch]))
        last = out.logits[torch.arange(len(batch)), torch.tensor(lens) - 1]
        for b, (s, req), tok in zip(range(len(batch)), batch, last.argmax(-1).tolist()):
            self.slot_req[s] = req
            self._emit(s, tok, last[b])

    def _copy_cache(self, cache: KVCache, slots: Tensor) -> None:
        """The prefill's packed sites into the pools: entries are taken once per stream and
        shared by the stream's layers (their sites hold the same tokens)."""
        taken: dict[tuple[int, int], Tensor] = {}
        for key, site in cache.sites.items():
            assert isinstance(site, PackedSite)
            pool, stream, layer = self._site(key)
            if (id(pool), stream) not in taken:
                row, counts = site.row.cpu(), site.counts.cpu()
                ids = pool.fill(stream, slots, row, counts)
                taken[(id(pool), stream)] = ids.to(self.device)
            pool.write(layer, taken[(id(pool), stream)], site.k, site.v)

    def _site(self, key: tuple) -> tuple[KVPool, int, int]:
        """Pool, stream and layer of a ``KVCache`` key ("pre", i), ("rec", r, j), ("post", i)."""
        if key[0] == "rec":
            return self.rec, key[1], key[2]
        return self.outer, 0, key[1] + (0 if key[0] == "pre" else self.n_pre)

    def _emit(self, s: int, tok: int, logits: Tensor) -> None:
        req = self.slot_req[s]
        assert req is not None
        req.out.append(tok)
        if self.record_logits:
            req.logits.append(logits.detach().clone())
        self.stats.generated_tokens += 1
        if len(req.out) >= req.max_new or (self.eos_id is not None and tok == self.eos_id):
            self.stats.kv_bytes_finished += self.kv_bytes(s)
            self.outer.release(s)
            self.rec.release(s)
            self.results[req.rid] = req.out
            self.slot_req[s], self.stage[s] = None, _IDLE
        else:
            self.stage[s], self.token[s] = _ENTRY, tok
            self.pos[s] = len(req.prompt) + len(req.out) - 1

    # ------------------------------------------------------------------ the three stages
    def _enter(self, slots: list[int]) -> None:
        """Embed fed-back tokens, run the unique first layer(s), route for recursion 0."""
        idx = torch.tensor(slots)
        x = self.model.embed(torch.tensor([self.token[s] for s in slots], device=self.device))
        cos, sin = self._rope(slots, fresh=True)
        if self.outer.layers:  # one entry per token for the unique first and last layers
            self.outer_ids[idx] = self.outer.append(torch.zeros_like(idx), idx)
        if self.n_pre:
            plan = self._plan(self.outer, torch.zeros_like(idx), idx, self.outer_ids[idx])
            for i in range(self.n_pre):
                x = self._layer(i, x, cos, sin, self.outer, i, plan)
            self.stats.layer_calls["pre"] += self.n_pre
        self.stats.decode_tokens += len(slots)
        self.h[idx.to(self.device)] = x
        self._route(slots, [0] * len(slots), x)

    def _plan(
        self, pool: KVPool, stream: Tensor, slot: Tensor, ids: Tensor, writes: Tensor | None = None
    ) -> _Plan:  # fmt: skip
        """Rows (stream[i], slot[i]) attend to their entries (after this step's were added)."""
        idx, mask = pool.index(stream, slot)
        dev = self.device
        return _Plan(idx.to(dev), mask.to(dev)[:, None, None, :], ids.to(dev), writes)

    def _route(self, slots: list[int], nxt: list[int], x: Tensor) -> None:
        """Send each token to recursion nxt[i] (set its gate) or, if it stops, to the exit.

        The decision is the model's own inference rule, ``Router.decide``, per group of tokens
        at the same recursion, with each slot's memo from its earlier decisions.
        """
        go = [r < self.n_rec for r in nxt]
        for r in sorted(set(nxt)):
            rows = [i for i, ri in enumerate(nxt) if ri == r and go[i]]
            if not rows:
                continue
            sl = torch.tensor([slots[i] for i in rows], device=self.device)
            memo = {k: buf[sl] for k, buf in self.memo.items()}
            dec = self.model.router.decide(x[torch.tensor(rows, device=self.device)], r, memo)
            for k, v in dec.memo.items():
                if k not in self.memo:
                    self.memo[k] = v.new_zeros((self.max_slots, *v.shape[1:]))
                self.memo[k][sl] = v
            if dec.gate is not None:
                self.gate[sl] = dec.gate
            for i, keep in zip(rows, dec.keep.tolist()):
                go[i], self.gated[slots[i]] = keep, dec.gate is not None
        for i, s in enumerate(slots):
            if go[i]:
                self.stage[s], self.r[s] = _REC, nxt[i]
            else:
                self.stage[s] = _EXIT
                self.slot_req[s].depths.append(nxt[i])  # type: ignore[union-attr]
                self.stats.tokens_per_depth[nxt[i]] += 1

    def _recurse(self, slots: list[int]) -> None:
        """One pass of the shared block over all tokens at any recursion (depth-wise batch)."""
        idx = torch.tensor(slots)
        dev_idx = idx.to(self.device)
        rs = [self.r[s] for s in slots]
        if len(set(rs)) > 1:
            self.stats.mixed_depth_passes += 1
        r_t = torch.tensor(rs)
        # Recursive KV sharing: every recursion reads recursion 0's site; only r = 0 writes.
        a = torch.zeros_like(r_t) if self.shared_kv else r_t
        writes = (r_t == 0) if self.shared_kv else None
        ids = torch.zeros_like(idx)
        w = slice(None) if writes is None else writes
        if writes is None or bool(writes.any()):
            ids[w] = self.rec.append(a[w], idx[w])
        plan = self._plan(self.rec, a, idx, ids, writes)
        x = self.h[dev_idx]
        cos, sin = self._rope(slots)
        y = x
        for j in range(self.base):
            layers = [self.layer_of[r][j] for r in rs]
            groups = sorted(set(layers))
            if len(groups) == 1:
                y = self._layer(groups[0], y, cos, sin, self.rec, j, plan)
            else:  # sequence sharing: position j of different recursions = different layers
                out = torch.empty_like(y)
                for u in groups:
                    rows = torch.tensor([i for i, lu in enumerate(layers) if lu == u])
                    dr = rows.to(self.device)
                    sub = plan.subset(rows)
                    out[dr] = self._layer(u, y[dr], cos[dr], sin[dr], self.rec, j, sub)
                y = out
            self.stats.layer_calls["rec"] += len(groups)
            self.stats.rec_rows += len(slots)
        gated = [self.gated[s] for s in slots]
        if any(gated):  # H + g·f(H), f = Block(H) − H (paper Eq. 1); ungated: Block(H)
            g = self.gate[dev_idx]
            mask = torch.tensor(gated, device=self.device)[:, None]
            y = torch.where(mask, x + g[:, None] * (y - x), y)
        self.h[dev_idx] = y
        for r in rs:
            self.stats.tokens_per_recursion[r] += 1
        self._route(slots, [r + 1 for r in rs], y)

    def _exit(self, slots: list[int]) -> None:
        """Unique last layer(s), final norm and LM head; emit the greedy token."""
        idx = torch.tensor(slots)
        x = self.h[idx.to(self.device)]
        cos, sin = self._rope(slots)
        n_unique = self.cfg.num_unique_layers
        if self.n_post:  # the entries taken at entry (the stream is shared with the first)
            plan = self._plan(self.outer, torch.zeros_like(idx), idx, self.outer_ids[idx])
            for i in range(self.n_post):
                x = self._layer(n_unique - 1 - i, x, cos, sin, self.outer, self.n_pre + i, plan)
            self.stats.layer_calls["post"] += self.n_post
        m = self.model
        weight = m.embed.weight if m.lm_head is None else m.lm_head.weight
        logits = F.linear(m.norm(x), weight)
        for b, (s, tok) in enumerate(zip(slots, logits.argmax(-1).tolist())):
            self._emit(s, tok, logits[b])

    # ------------------------------------------------------------------ one decoder layer
    def _rope(self, slots: list[int], fresh: bool = False) -> tuple[Tensor, Tensor]:
        """cos, sin [n, 1, 1, hd] at each slot's position: computed at entry, then reused."""
        idx = torch.tensor(slots, device=self.device)
        if fresh:
            pos = torch.tensor([self.pos[s] for s in slots], device=self.device)
            cos, sin = self.model.rotary(pos[:, None])
            if self.fast:  # x·cos + rot(x)·sin, rot(x) = [−x₂, x₁] = roll(x)·[−1, 1]: sign in sin
                h = sin.shape[-1] // 2
                sin = torch.cat([-sin[..., :h], sin[..., h:]], -1)
            self.rope[:, idx] = torch.stack([cos, sin]).to(self.dtype)
        return self.rope[0, idx], self.rope[1, idx]

    def _rotate(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotary embedding of x [n, H, 1, hd] (``apply_rotary``'s arithmetic)."""
        if not self.fast:
            return apply_rotary(x, cos, sin)
        return x * cos + x.roll(x.shape[-1] // 2, -1) * sin

    def _norm(self, norm: torch.nn.Module, x: Tensor) -> Tensor:
        if not self.fast:
            return norm(x)
        return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.eps)

    def _layer(
        self, u: int, x: Tensor, cos: Tensor, sin: Tensor, pool: KVPool, layer_at: int,
        plan: _Plan,
    ) -> Tensor:  # fmt: skip
        """Unique layer ``u`` on one token per row, caching at the pool's layer ``layer_at``.

        The rows that write (``plan``) project their key/value into their new entries; the
        others reuse the site as it is (recursive KV sharing). Every row then attends to its
        entries ``plan.idx``.
        """
        layer = self.model.layers[u]
        att = layer.attn
        n, hd = x.shape[0], att.hd
        xn = self._norm(layer.attn_norm, x)
        # [n, H, 1, hd] straight from the projection (a view: the query axis has length 1).
        q = self._rotate(F.linear(xn, att.q_proj.weight).view(n, att.n_heads, 1, hd), cos, sin)
        if plan.any_write:
            xw, cw, sw = xn, cos, sin
            if plan.w_rows is not None:
                xw, cw, sw = xn[plan.w_rows], cos[plan.w_rows], sin[plan.w_rows]
            m = xw.shape[0]
            k = self._rotate(F.linear(xw, att.k_proj.weight).view(m, att.n_kv, 1, hd), cw, sw)
            v = F.linear(xw, att.v_proj.weight).view(m, att.n_kv, hd)
            pool.write(layer_at, plan.w_ids, k.view(m, att.n_kv, hd), v)
        keys, vals = pool.read(layer_at, plan.idx)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=plan.mask, enable_gqa=True)
        h = x + F.linear(out.reshape(n, att.n_heads * hd), att.o_proj.weight)
        return h + layer.mlp(self._norm(layer.mlp_norm, h))
