"""Mixture-of-Recursions language model (Bae et al., 2025, arXiv 2507.10524).

One stack of shared decoder layers (the recursion block) is applied up to N_r times; a router
decides per token how many recursions it gets. The shapes:

    embed → [unique first layer] → recursion block × N_r (routed) → [unique last layer] → head

(the bracketed layers exist for the middle-cycle / middle-sequence sharing strategies, §2.1).
A recursion runs only the tokens its router keeps: they are gathered (in causal order), run
through the block with their original positions, and scattered back. A selected token gets the
paper's gated update (§2.2.1, Eq. 1)

    H^{r+1}_t = H^r_t + g^r_t · f(H^r_t),   f(H) = Block(H) − H   (the block's residual branch)

and a token not selected keeps H^r_t. The official code adds g · Block(H) instead, which counts
the residual stream twice (H + g·(H + f(H))); we follow the paper so that g = 1 is exactly the
plain recursive transformer and g → 0 is an exact skip.

This file holds no training infrastructure: no precision, parallelism or optimizer choices.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mor.config import MoRConfig
from mor.kvcache import KVCache, as_site
from mor.layers import DecoderLayer, KVSite, RMSNorm, Rotary, TokenBatch
from mor.routing import Router, make_router

AUX_ROUTER_LOSS_WEIGHT = 1e-3
"""Weight of the auxiliary router's BCE loss (ec_inference='aux_router'); see the loss sum."""


@dataclass
class RoutingStats:
    """What the routers did in one forward (over valid tokens)."""

    active_fraction: list[float]  # fraction of tokens that ran recursion r
    tokens_per_depth: list[int]  # tokens whose final depth is d, for d = 0..N_r
    mean_depth: float
    losses: dict[str, float]  # unweighted router losses (aux, z, balance), averaged

    @classmethod
    def from_counts(
        cls, active_fraction: list[float], tokens_per_depth: list[int], losses: dict[str, float]
    ) -> RoutingStats:
        """Stats whose mean depth is the token-weighted mean of ``tokens_per_depth``."""
        total = sum(tokens_per_depth)
        mean = sum(d * n for d, n in enumerate(tokens_per_depth)) / total if total else 0.0
        return cls(list(active_fraction), list(tokens_per_depth), float(mean), dict(losses))

    @classmethod
    def merge(cls, stats: list[RoutingStats]) -> RoutingStats:
        """Several forwards as one (e.g. the micro-batches of an optimizer step).

        Active fractions and losses are averaged over the forwards, token counts summed, and
        the mean depth recomputed from the summed counts.
        """
        if not stats:
            raise ValueError("stats: merge needs at least one RoutingStats")
        n = len(stats)
        active = [sum(col) / n for col in zip(*(s.active_fraction for s in stats), strict=True)]
        counts = [sum(col) for col in zip(*(s.tokens_per_depth for s in stats), strict=True)]
        losses = {k: sum(s.losses[k] for s in stats) / n for k in stats[0].losses}
        return cls.from_counts(active, counts, losses)

    def to_metrics(self, prefix: str = "router/") -> dict[str, float]:
        """The dashboard keys: mean depth, share of tokens at each final depth (``dead_frac``
        is depth 0: tokens that ran no recursion), active fraction per recursion, losses."""
        out = {f"{prefix}mean_depth": self.mean_depth}
        total = max(1, sum(self.tokens_per_depth))
        for d, n in enumerate(self.tokens_per_depth):
            out[f"{prefix}frac_depth_{d}"] = n / total
        dead = self.tokens_per_depth[0] if self.tokens_per_depth else 0
        out[f"{prefix}dead_frac"] = dead / total
        for r, f in enumerate(self.active_fraction):
            out[f"{prefix}active_r{r + 1}"] = f
        for k, v in self.losses.items():
            out[f"{prefix}{k}_loss"] = v
        return out


@dataclass
class RoutingCounts:
    """``RoutingStats`` still on the device: what a forward keeps so that it never waits for
    the device (a host read per statistic would stall a GPU's stream and break a compiled
    graph). ``read`` copies everything to the host in one transfer; the trainer reads once
    per optimizer step (``trainers.step_metrics``)."""

    active_fraction: torch.Tensor  # [N_r] float64: fraction of valid tokens that ran recursion r
    tokens_per_depth: torch.Tensor  # [N_r + 1] long: valid tokens whose final depth is d
    losses: dict[str, torch.Tensor]  # unweighted router losses (scalars, detached)

    def vector(self) -> torch.Tensor:
        """Everything as one float64 vector: active fractions, depth counts, then the losses
        in ``losses``' key order (what ``read`` and the trainer's all-reduce move)."""
        parts = [self.active_fraction.double(), self.tokens_per_depth.double()]
        parts += [v.reshape(1).double() for v in self.losses.values()]
        return torch.cat(parts)

    def read(self) -> RoutingStats:
        """The host copy (one device-to-host transfer)."""
        n, values = len(self.active_fraction), self.vector().tolist()
        counts = [int(c) for c in values[n : 2 * n + 1]]
        losses = dict(zip(self.losses, values[2 * n + 1 :], strict=True))
        return RoutingStats.from_counts(values[:n], counts, losses)


@dataclass
class MoROutput:
    logits: torch.Tensor  # None once a training loop has dropped it (the backward needs none)
    loss: torch.Tensor | None = None  # lm_loss + weighted router losses (what to backprop)
    lm_loss: torch.Tensor | None = None
    router_loss: torch.Tensor | None = None
    routing: RoutingCounts | None = None  # routing statistics, on the device
    cache: KVCache | None = None
    depth: torch.Tensor | None = None  # [B, T] recursions each token ran
    _stats: RoutingStats | None = field(default=None, repr=False)

    @property
    def stats(self) -> RoutingStats | None:
        """Routing statistics on the host: reads ``routing`` from the device on first use."""
        if self._stats is None and self.routing is not None:
            self._stats = self.routing.read()
        return self._stats


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2:
        return x.gather(1, idx)
    return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))


class MoRModel(nn.Module):
    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        # Each unique layer exists once; the layer map says where it is reused (§2.1).
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_unique_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = (
            None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        )
        self.rotary = Rotary(cfg.head_dim, cfg.rope_base)
        # router='none' gets a router too (keep every token, ungated): one code path.
        self.router: Router = make_router(cfg)
        aux = set(self.router.aux_nets.modules()) if hasattr(self.router, "aux_nets") else set()
        for m in self.modules():
            if m not in aux:
                self._init_weights(m)
        # Scale the residual-branch outputs by depth (GPT-2 style) for stable deep stacks.
        for layer in self.layers:
            for p in (layer.attn.o_proj.weight, layer.mlp.down_proj.weight):
                nn.init.normal_(p, std=cfg.init_std / (2 * cfg.num_layers) ** 0.5)
        # The auxiliary router (ec_inference='aux_router') last and off the RNG stream: the
        # rest of the model is initialised exactly as with the other inference rules.
        with torch.random.fork_rng(devices=[]):
            for m in aux:
                self._init_weights(m)

    def _init_weights(self, m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=self.cfg.init_std)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=self.cfg.init_std)

    # ------------------------------------------------------------------ parameters
    def num_parameters(self) -> dict[str, int]:
        """Unique parameters, split into embedding (+ untied head) and non-embedding."""
        emb = self.embed.weight.numel() + (self.lm_head.weight.numel() if self.lm_head else 0)
        total = sum(p.numel() for p in self.parameters())
        return {"total": total, "embedding": emb, "non_embedding": total - emb}

    # ------------------------------------------------------------------ forward
    def _batch(
        self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor, all_valid: bool | None
    ) -> TokenBatch:
        """``all_valid``: True when the caller knows every token is valid (packed batches);
        None reads it from ``valid`` (padded or routed batches: a host sync, see ``forward``)."""
        cos, sin = self.rotary(pos)
        if all_valid is None:
            all_valid = bool(valid.all())
        # cos/sin stay float64: apply_rotary casts them once to its compute dtype (bf16-safe).
        return TokenBatch(x, pos, valid, cos, sin, all_valid)

    def _run_layer(
        self, i: int, key: tuple, tb: TokenBatch, sites: dict, reuse: KVSite | None = None
    ) -> torch.Tensor:
        # A KVCache's sites are packed between forwards: expand the ones this layer reads.
        out, store = self.layers[i](tb, past=as_site(sites.get(key)), reuse=as_site(reuse))
        if store is not None:
            sites[key] = store
        return out

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        max_depth: int | None = None,
        cache: KVCache | None = None,
        force_depth: int | None = None,
        topk_routing: bool = False,
    ) -> MoROutput:
        """Run the model.

        input_ids [B, T]; attention_mask [B, T] (1 = real token; padding may be on either side);
        labels [B, T] (next-token targets are labels shifted left inside; -100 is ignored);
        max_depth caps the recursions at test time (1..N_r): the router still decides within the
        cap. force_depth (1..N_r) instead sends every token through exactly that many
        recursions, ignoring the router's selection (its gates still weigh the updates): the
        fixed test-time depth of a compute-vs-accuracy curve. cache enables incremental
        decoding (inference only). Routing is the training routing in ``train()`` mode and the
        causal, per-token inference routing (``Router.decide``) in ``eval()`` mode.
        topk_routing: training's sequence-wide top-k in ``eval()`` mode (the paper's
        evaluation, non-causal; no router state changes).

        Host syncs: without ``attention_mask`` (packed batches, the training case) every token
        is valid and every shape is known on the host: expert-choice training keeps a static
        k = ⌈capacity · T⌉ tokens per row, and the forward never reads the device (it compiles
        into one graph per recursion block or fewer; ``benchmarks/compile_check.py``). With
        padding, or with routing decided per token (inference, token-choice), rows keep
        different numbers of tokens and the gather's width is read from the device, once per
        recursion (``_recursion``)."""
        cfg = self.cfg
        if cache is not None and (self.training or topk_routing):
            raise ValueError(
                "cache: incremental decoding is only defined in eval() mode with causal routing"
            )
        n_rec = self._num_recursions(max_depth, force_depth)
        b, t = input_ids.shape
        dev = input_ids.device
        packed = attention_mask is None  # no padding: every count below is a Python int
        valid = (
            torch.ones(b, t, dtype=torch.bool, device=dev)
            if packed
            else attention_mask.to(torch.bool)
        )
        offset = torch.zeros(b, dtype=torch.long, device=dev)
        if cache is not None and cache.seen is not None:
            offset = cache.seen
        pos = (offset[:, None] + valid.long().cumsum(-1) - 1).clamp_min(0)
        sites: dict[tuple, KVSite] = cache.sites if cache is not None else {}

        h = self.embed(input_ids)
        full = self._batch(h, pos, valid, True if packed else None)
        for i in range(cfg.num_prefix_layers):
            h = self._run_layer(i, ("pre", i), self._with_x(full, h), sites)
        h, depth, active, losses = self._recursions(
            h, pos, valid, packed, n_rec, force_depth, sites, self.training or topk_routing
        )
        for i in range(cfg.num_suffix_layers):
            key = ("post", i)
            h = self._run_layer(cfg.num_unique_layers - 1 - i, key, self._with_x(full, h), sites)

        h = self.norm(h)
        weight = self.embed.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(h, weight)
        if cache is not None:
            cache.seen = offset + valid.long().sum(-1)
            cache.compact()  # hold valid entries only between steps (mor.kvcache)
        out = MoROutput(logits=logits, cache=cache, depth=depth)
        self._losses_and_stats(out, labels, valid, packed, active, losses)
        return out

    def _num_recursions(self, max_depth: int | None, force_depth: int | None) -> int:
        """Recursions to run: N_r, capped by max_depth and force_depth (validated here)."""
        n_rec = self.cfg.num_recursions
        if max_depth is not None:
            if not 1 <= max_depth <= n_rec:
                raise ValueError(f"max_depth: must be in 1..{n_rec}, got {max_depth}")
            n_rec = max_depth
        if force_depth is not None:
            if not 1 <= force_depth <= self.cfg.num_recursions:
                raise ValueError(
                    f"force_depth: must be in 1..{self.cfg.num_recursions}, got {force_depth}"
                )
            n_rec = min(n_rec, force_depth)
        return n_rec

    def _recursions(
        self,
        h: torch.Tensor,
        pos: torch.Tensor,
        valid: torch.Tensor,
        packed: bool,
        n_rec: int,
        force_depth: int | None,
        sites: dict,
        topk: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], dict[str, list[torch.Tensor]]]:
        """The routed recursion stack: recursion r runs the tokens the router keeps (§2.2).

        ``topk``: training's routing (``Router.train_decide``), else the causal inference rule.
        ``packed``: no padding (``valid`` is all True), so routers that know how many tokens
        each row keeps say so (``Decision.kept``) and the gathers have static shapes.
        Returns hidden states, each token's depth, the number of tokens that ran each
        recursion (device scalars) and the unweighted router losses (one entry per recursion
        that produced them).
        """
        depth = torch.zeros_like(valid, dtype=torch.long)
        losses: dict[str, list[torch.Tensor]] = {}
        ran: list[torch.Tensor] = []
        # Tokens per row still active, when known on the host (None: read it per recursion).
        n_active: int | None = valid.shape[1] if packed else None
        active, memo = valid, {}
        for r in range(n_rec):
            # Hierarchical: a token the router drops at r is not eligible at deeper recursions.
            dec, step_losses = self.router.route(
                h, r, memo, active, None if packed else valid, topk, force_depth
            )
            for k, v in step_losses.items():
                losses.setdefault(k, []).append(v)
            memo = dec.memo
            if not dec.keeps_all:
                active = active & dec.keep
                n_active = dec.kept
            ran.append(active.sum())
            depth = depth + active.long()
            h = self._recursion(r, h, pos, active, n_active, dec.gate, sites)
        return h, depth, ran, losses

    def _losses_and_stats(
        self,
        out: MoROutput,
        labels: torch.Tensor | None,
        valid: torch.Tensor,
        packed: bool,
        ran: list[torch.Tensor],
        losses: dict[str, list[torch.Tensor]],
    ) -> None:
        """Fill ``out``'s losses (LM + weighted router losses) and routing statistics (kept on
        the device: ``RoutingCounts``)."""
        cfg, logits, depth = self.cfg, out.logits, out.depth
        assert depth is not None
        router_loss = logits.new_zeros((), dtype=torch.float32)
        # The auxiliary router sees detached inputs, so its loss trains nothing else; Adam is
        # blind to a loss's scale, so a small weight leaves its learning as it is while keeping
        # its gradients out of the global-norm clipping the main model's updates go through.
        coefs = {
            "aux": cfg.aux_loss_coef,
            "aux_router": AUX_ROUTER_LOSS_WEIGHT,
            "z": cfg.z_loss_coef,
            "balance": cfg.balancing_coef,
        }
        mean_losses = {k: torch.stack(v).mean() for k, v in losses.items()}
        for k, v in mean_losses.items():
            router_loss = router_loss + coefs[k] * v
        if labels is not None:
            # Next-token targets: the labels shift left and the last position is ignored, so
            # the logits are used in place (shifting them would copy B·T·V floats when B > 1).
            target = F.pad(labels[:, 1:], (0, 1), value=-100)
            if not packed:
                target = target.masked_fill(~F.pad(valid[:, 1:], (0, 1)), -100)
            lm = F.cross_entropy(logits.flatten(0, 1).float(), target.flatten(), ignore_index=-100)
            out.lm_loss, out.router_loss, out.loss = lm, router_loss, lm + router_loss
        else:
            out.router_loss = router_loss
        if cfg.router != "none" or cfg.sharing != "none":
            n_r = cfg.num_recursions
            n_valid = valid.numel() if packed else valid.sum().clamp_min(1)
            # Recursions skipped by a depth cap ran no tokens.
            ran = ran + [torch.zeros_like(ran[0])] * (n_r - len(ran))
            at_depth = depth[..., None] == torch.arange(n_r + 1, device=depth.device)
            if not packed:
                at_depth = at_depth & valid[..., None]
            out.routing = RoutingCounts(
                active_fraction=torch.stack(ran).double() / n_valid,
                tokens_per_depth=at_depth.flatten(0, -2).sum(0),
                losses={k: v.detach() for k, v in mean_losses.items()},
            )

    @staticmethod
    def _with_x(tb: TokenBatch, x: torch.Tensor) -> TokenBatch:
        return TokenBatch(x, tb.pos, tb.valid, tb.cos, tb.sin, tb.all_valid)

    def _recursion(
        self,
        r: int,
        h: torch.Tensor,
        pos: torch.Tensor,
        active: torch.Tensor,
        n_active: int | None,
        gate: torch.Tensor | None,
        sites: dict,
    ) -> torch.Tensor:
        """Apply recursion r to the active tokens of h and return the updated hidden states.

        ``n_active``: tokens active in every row, when known on the host (packed training
        batches: static shapes, no host sync); None when rows differ (padding, inference or
        token-choice routing): the gather is as wide as the fullest row, read from the device
        (a host sync, and a graph break under ``torch.compile``: shapes depend on the data).
        """
        cfg = self.cfg
        t = active.shape[1]
        if n_active is None:
            counts = active.sum(-1)
            k, fewest = torch.stack([counts.max(), counts.min()]).tolist()  # one host read
            if k == 0:
                return h
            sel_valid = torch.arange(k, device=h.device)[None, :] < counts[:, None]
            all_valid = fewest == k  # every row is full: the causal fast path
        else:
            k, all_valid = n_active, True  # every row has exactly k active tokens
            sel_valid = torch.ones(active.shape[0], k, dtype=torch.bool, device=h.device)
        gathered = k < t
        if gathered:
            # Active tokens first, in their original (causal) order: a stable sort on ~active.
            order = torch.sort((~active).to(torch.int8), dim=-1, stable=True).indices
            idx = order[:, :k]
            x, p = _gather_rows(h, idx), _gather_rows(pos, idx)
            g = None if gate is None else _gather_rows(gate, idx)
        else:
            idx, x, p, g = None, h, pos, gate
            sel_valid = active if n_active is None else sel_valid
        tb = self._batch(x, p, sel_valid, all_valid)
        y = x
        for j, layer_idx in enumerate(cfg.recursion_layers(r)):
            if cfg.kv_cache == "shared" and r > 0:
                # Recursive KV sharing (§2.3): reuse recursion 1's keys/values of this layer.
                reuse = sites[("rec", 0, j)]
                y = self._run_layer(layer_idx, ("rec", r, j), self._with_x(tb, y), sites, reuse)
            else:
                y = self._run_layer(layer_idx, ("rec", r, j), self._with_x(tb, y), sites)
        if g is not None:
            y = x + g[..., None] * (y - x)  # H + g · f(H), f = the block's residual branch
        if n_active is None:
            y = torch.where(sel_valid[..., None], y, x)
        if not gathered:
            return y
        return h.scatter(1, idx[..., None].expand(-1, -1, h.shape[-1]), y)

    # ------------------------------------------------------------------ routing upkeep
    def update_router_bias(self) -> None:
        """Call after each optimizer step: the loss-free balancing bias update (token-choice)."""
        self.router.update_bias()
