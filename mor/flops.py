"""FLOPs and KV-cache accounting of Mixture-of-Recursions models (arXiv 2507.10524).

Everything here is analytic: it reads a ``MoRConfig`` and the fraction of tokens that run each
recursion and counts matmul work only (2·m·n·k per matmul, as ``torch.utils.flop_counter``
does). Two conventions:

``exact``
    What the module in ``mor.model`` executes: grouped-query projections, the router, the
    tied LM head, and attention over the tokens a recursion actually gathers. With
    ``attention="dense"`` it reproduces ``FlopCounterMode`` (which counts SDPA as a full
    T×S score matrix even when it is causal); ``attention="causal"`` counts only the useful
    half (a query at position i sees i+1 keys).
``paper``
    The accounting the paper uses to set compute budgets (§3.1, Table 1, App. C): every
    attention projection is d×d (GQA ignored), causal attention 2·N·d per token per layer,
    no router, no embedding, no LM head; the training budget is the forward count itself.

Routing enters through ``a_r``, the fraction of the sequence's tokens that run recursion r
(§2.2): a recursion costs a_r of a full layer stack in projections and MLP, and its attention
runs a_r·N queries over a_r·N keys with recursion-wise caching or over the first recursion's
a_0·N keys with recursive KV sharing (§2.3, Fig. 2c), whose deeper recursions also skip the
key/value projections.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mor.config import MoRConfig

if TYPE_CHECKING:
    from mor.model import RoutingStats

__all__ = [
    "FlopsBreakdown",
    "active_fractions_from_stats",
    "forward_flops_per_token",
    "inference_flops_by_depth",
    "kv_cache_bytes_per_token",
    "steps_for_budget",
    "training_flops_per_token",
]

Convention = Literal["exact", "paper"]
AttentionCount = Literal["causal", "dense"]


@dataclass
class FlopsBreakdown:
    """Forward FLOPs per token (averaged over the sequence's tokens), split by component."""

    layers: float
    """Linear/projection and MLP matmuls of all decoder layers (unique and recursive)."""
    attention: float
    """Attention core: QK^T and the weighted sum of V."""
    router: float
    """Router network(s); 0 without a router and in the paper convention."""
    lm_head: float
    """Output projection onto the vocabulary; 0 in the paper convention."""
    embedding: float
    """Input embedding: a table lookup, so 0; kept for reporting."""
    per_recursion: list[float] = field(default_factory=list)
    """layers + attention FLOPs of each recursion r = 0..N_r−1."""

    @property
    def total(self) -> float:
        return self.layers + self.attention + self.router + self.lm_head + self.embedding

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["per_recursion"] = list(self.per_recursion)
        out["total"] = self.total
        return out


# ----------------------------------------------------------------------------- validation
def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: must be one of {list(allowed)}, got {value!r}")


def _seq_len(cfg: MoRConfig, seq_len: int | None) -> int:
    if seq_len is None:
        return cfg.max_seq_len
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len: must be a positive integer, got {seq_len!r}")
    return seq_len


def _max_depth(cfg: MoRConfig, max_depth: int | None) -> int:
    n_r = cfg.num_recursions
    if max_depth is None:
        return n_r
    if isinstance(max_depth, bool) or not isinstance(max_depth, int) or not 1 <= max_depth <= n_r:
        raise ValueError(f"max_depth: must be an integer in 1..{n_r}, got {max_depth!r}")
    return max_depth


def _fractions(cfg: MoRConfig, active_fractions: Sequence[float] | None) -> list[float]:
    n_r = cfg.num_recursions
    if active_fractions is None:
        return [float(a) for a in cfg.expected_active_fractions()]
    fr = [float(a) for a in active_fractions]
    if len(fr) != n_r:
        raise ValueError(
            f"active_fractions: needs one value per recursion ({n_r}), got {len(fr)}: {fr}"
        )
    if any(not (0.0 <= a <= 1.0) or math.isnan(a) for a in fr):
        raise ValueError(f"active_fractions: each value must lie in [0, 1], got {fr}")
    return fr


# ----------------------------------------------------------------------------- pieces
def _linear_per_token(cfg: MoRConfig, convention: str, project_kv: bool) -> float:
    """Projection + SwiGLU matmul FLOPs of one decoder layer for one token."""
    d, f = cfg.hidden_size, cfg.ffn_size
    if convention == "paper":
        attn = 4 * d * d if project_kv else 2 * d * d
    else:
        dq, dkv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        attn = d * dq + dq * d + (2 * d * dkv if project_kv else 0)
    return 2.0 * (attn + 3 * d * f)


def _attention_per_query(
    cfg: MoRConfig, n_tokens: float, convention: str, attention: str, key_fraction: float = 1.0
) -> float:
    """QK^T + AV FLOPs of one query of a causal sequence of ``n_tokens`` (one layer).

    The keys are ``key_fraction`` of those tokens (recursive KV sharing reads recursion 0's
    a_0·N keys). Causal: a query sees on average key_fraction·(n+1)/2 keys; dense (SDPA with a
    full mask, what ``FlopCounterMode`` counts): key_fraction·n. The paper counts n/2.
    """
    if n_tokens <= 0:
        return 0.0
    if convention == "paper":
        return 4.0 * cfg.hidden_size * key_fraction * n_tokens / 2.0
    keys = n_tokens if attention == "dense" else (n_tokens + 1.0) / 2.0
    return 4.0 * cfg.num_heads * cfg.head_dim * key_fraction * keys


def _router_net_flops(cfg: MoRConfig, n_out: int) -> float:
    d = cfg.hidden_size
    if cfg.router_network == "linear":
        return 2.0 * d * n_out
    return 2.0 * (d * 2 * d + 2 * d * n_out)


# ----------------------------------------------------------------------------- public API
def forward_flops_per_token(
    cfg: MoRConfig,
    seq_len: int | None = None,
    active_fractions: Sequence[float] | None = None,
    max_depth: int | None = None,
    convention: Convention = "exact",
    attention: AttentionCount = "causal",
) -> FlopsBreakdown:
    """Forward FLOPs per token of ``cfg`` on sequences of ``seq_len`` tokens.

    ``active_fractions[r]`` is the fraction of tokens that run recursion r (default: the
    config's expected routing, ``cfg.expected_active_fractions()``: the expert-choice
    capacities, or (N_r − r)/N_r for a balanced token-choice router). Recursions ≥
    ``max_depth`` do not run (test-time depth cap). The unique first/last layers of the middle
    sharing strategies and every layer of a vanilla model run all N tokens.
    """
    _check_choice("convention", convention, ("exact", "paper"))
    _check_choice("attention", attention, ("causal", "dense"))
    if convention == "paper" and attention != "causal":
        raise ValueError("attention: the paper convention counts causal attention only")
    n = _seq_len(cfg, seq_len)
    depth_cap = _max_depth(cfg, max_depth)
    fr = [a if r < depth_cap else 0.0 for r, a in enumerate(_fractions(cfg, active_fractions))]
    paper = convention == "paper"
    shared = cfg.kv_cache == "shared"

    # Unique prefix/suffix layers: every token, causal over the whole sequence.
    n_unique = cfg.num_prefix_layers + cfg.num_suffix_layers
    layers = n_unique * _linear_per_token(cfg, convention, project_kv=True)
    attn = n_unique * _attention_per_query(cfg, n, convention, attention)

    # Recursion block (a vanilla model is one "recursion" of all its layers, a_0 = 1).
    per_recursion: list[float] = []
    block = cfg.recursion_depth
    for r, a in enumerate(fr):
        reuse = shared and r > 0
        lin_r = block * a * _linear_per_token(cfg, convention, project_kv=not reuse)
        if reuse:  # a_r·N queries over the a_0·N tokens recursion 0 stored
            per_query = _attention_per_query(cfg, n, convention, attention, key_fraction=fr[0])
        else:  # a_r·N queries among themselves
            per_query = _attention_per_query(cfg, a * n, convention, attention)
        attn_r = block * a * per_query
        layers += lin_r
        attn += attn_r
        per_recursion.append(lin_r + attn_r)

    return FlopsBreakdown(
        layers=layers,
        attention=attn,
        router=0.0 if paper else _router_flops(cfg, depth_cap),
        lm_head=0.0 if paper else 2.0 * cfg.hidden_size * cfg.vocab_size,
        embedding=0.0,
        per_recursion=per_recursion,
    )


def _router_flops(cfg: MoRConfig, depth_cap: int) -> float:
    """Router FLOPs per token (the paper's convention leaves them out)."""
    if cfg.router == "expert_choice":
        # One router per recursion, scoring all N tokens of every recursion that runs; with
        # ec_inference='aux_router' also the auxiliary router of each routed (capacity < 1) one.
        flops = depth_cap * _router_net_flops(cfg, 1)
        if cfg.ec_inference == "aux_router":
            d, h = cfg.hidden_size, max(8, cfg.hidden_size // 4)
            routed = sum(1 for c in cfg.capacity_schedule[:depth_cap] if c < 1.0)
            flops += routed * 2.0 * (d * h + h)
        return flops
    if cfg.router == "token_choice":
        return _router_net_flops(cfg, cfg.num_recursions)
    return 0.0


def training_flops_per_token(
    cfg: MoRConfig,
    seq_len: int | None = None,
    active_fractions: Sequence[float] | None = None,
    convention: Convention = "exact",
) -> float:
    """Training FLOPs per token.

    ``exact``: forward + backward ≈ 3 × forward (the backward pass does two matmuls per
    forward matmul). ``paper``: the forward count itself, the convention behind the paper's
    FLOPs budgets (so 16.5e18 FLOPs buys ≈ 9.4k steps of 1024×2048 tokens for the vanilla
    360M model, §3.1).
    """
    fwd = forward_flops_per_token(cfg, seq_len, active_fractions, convention=convention).total
    return fwd if convention == "paper" else 3.0 * fwd


def steps_for_budget(
    cfg: MoRConfig,
    budget_flops: float,
    tokens_per_step: int,
    seq_len: int | None = None,
    convention: Convention = "exact",
) -> int:
    """Optimizer steps a FLOPs budget pays for: floor(budget / (tokens/step × FLOPs/token))."""
    if not 0 < budget_flops < math.inf:
        raise ValueError(f"budget_flops: must be positive and finite, got {budget_flops!r}")
    if not tokens_per_step > 0:
        raise ValueError(f"tokens_per_step: must be positive, got {tokens_per_step!r}")
    per_token = training_flops_per_token(cfg, seq_len, convention=convention)
    return math.floor(budget_flops / (tokens_per_step * per_token))


def inference_flops_by_depth(
    cfg: MoRConfig, seq_len: int | None = None, convention: Convention = "exact"
) -> dict[int, FlopsBreakdown]:
    """Forward FLOPs per token when every token runs exactly d recursions, for d = 1..N_r."""
    n_r = cfg.num_recursions
    out: dict[int, FlopsBreakdown] = {}
    for depth in range(1, n_r + 1):
        fr = [1.0 if r < depth else 0.0 for r in range(n_r)]
        out[depth] = forward_flops_per_token(
            cfg, seq_len, fr, max_depth=depth, convention=convention
        )
    return out


def kv_cache_bytes_per_token(
    cfg: MoRConfig,
    kv_cache: str | None = None,
    active_fractions: Sequence[float] | None = None,
    bytes_per_element: int = 2,
) -> float:
    """KV-cache bytes per token of context, summed over attention sites (paper §2.3).

    Each site stores 2·num_kv_heads·head_dim elements per token it holds. Unique prefix/suffix
    layers (and every vanilla layer) hold every token. Recursion-wise caching keeps at
    recursion r only its a_r active tokens; recursive sharing stores recursion 0 only (a_0),
    which deeper recursions read.
    """
    mode = cfg.kv_cache if kv_cache is None else kv_cache
    _check_choice("kv_cache", mode, ("recursion_wise", "shared"))
    if mode == "shared" and cfg.sharing == "none":
        raise ValueError("kv_cache: 'shared' needs a recursive model (sharing != 'none')")
    if not bytes_per_element > 0:
        raise ValueError(f"bytes_per_element: must be positive, got {bytes_per_element!r}")
    fr = _fractions(cfg, active_fractions)
    per_site = 2.0 * cfg.num_kv_heads * cfg.head_dim * bytes_per_element
    sites = float(cfg.num_prefix_layers + cfg.num_suffix_layers)
    sites += cfg.recursion_depth * (fr[0] if mode == "shared" else sum(fr))
    return sites * per_site


def active_fractions_from_stats(stats: RoutingStats | None) -> list[float]:
    """Per-recursion active fractions of one forward, padded with 0 to N_r.

    A forward capped by ``max_depth`` reports only the recursions it ran; the rest are 0.
    """
    if stats is None:
        raise ValueError(
            "stats: is None (a vanilla model reports no routing stats; its fractions are [1.0])"
        )
    fr = [float(a) for a in stats.active_fraction]
    n_r = max(len(fr), len(stats.tokens_per_depth) - 1)
    return fr + [0.0] * (n_r - len(fr))


def flop_counter_mapping() -> dict:
    """``custom_mapping`` for ``torch.utils.flop_counter.FlopCounterMode`` that also counts
    attention on a CPU: the CPU SDPA kernel has no registered formula (the GPU kernels do,
    counted dense), so it gets the same dense formula."""
    import torch
    from torch.utils.flop_counter import sdpa_flop_count

    def cpu_sdpa_flop(q, k, v, *args, out_shape=None, **kw) -> int:
        return sdpa_flop_count(q, k, v)

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    return {op: cpu_sdpa_flop} if op is not None else {}
