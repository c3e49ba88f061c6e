"""Llama-style decoder layer: RMSNorm, rotary positions, grouped-query attention, SwiGLU.

Attention works on *gathered* tokens: a recursion only runs the tokens its router keeps, so
queries carry their original positions (RoPE uses them, paper §2.3) and a validity mask, and
keys/values come from a ``KVSite`` that may hold earlier tokens (decoding) or the first
recursion's keys (recursive KV sharing). All attention goes through
``F.scaled_dot_product_attention``; the unmasked causal case passes ``is_causal=True`` so a GPU
can use the flash kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mor.config import MoRConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # bf16 → fp32; fp64 stays
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary embedding evaluated at arbitrary (per-token) positions.

    The frequencies are computed (in float64) at every call rather than kept in a buffer: a
    buffer would be rounded by ``model.to(torch.bfloat16)`` and distort far positions.
    """

    def __init__(self, head_dim: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, base

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [B, T] → (cos, sin) of shape [B, 1, T, head_dim], in float64.

        float64 so that a token's rotation does not depend on the batch's shape (vectorised
        and scalar float32 cos differ in the last bit); ``apply_rotary`` casts once."""
        idx = torch.arange(0, self.head_dim, 2, dtype=torch.float64, device=positions.device)
        inv = 1.0 / (self.base ** (idx / self.head_dim))
        ang = positions.double()[..., None] * inv
        ang = torch.cat([ang, ang], dim=-1)[:, None]
        return ang.cos(), ang.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate in at least float32 (bf16 activations), or in float64 for a float64 model."""
    dt = torch.promote_types(x.dtype, torch.float32)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.to(dt) * cos.to(dt) + rotated.to(dt) * sin.to(dt)).to(x.dtype)


@dataclass
class KVSite:
    """Keys and values of one attention site with each entry's position and validity.

    ``valid`` is False for padding and for tokens a router did not send to this recursion, so
    they never receive attention (recursion-wise caching, paper §2.3).
    """

    k: torch.Tensor  # [B, H_kv, S, hd]
    v: torch.Tensor  # [B, H_kv, S, hd]
    pos: torch.Tensor  # [B, S] long
    valid: torch.Tensor  # [B, S] bool

    def append(self, other: KVSite) -> KVSite:
        return KVSite(
            torch.cat([self.k, other.k], dim=2),
            torch.cat([self.v, other.v], dim=2),
            torch.cat([self.pos, other.pos], dim=1),
            torch.cat([self.valid, other.valid], dim=1),
        )

    def num_valid(self) -> int:
        return int(self.valid.sum())


@dataclass
class TokenBatch:
    """The tokens a layer runs on: hidden states plus positions and validity."""

    x: torch.Tensor  # [B, T, d]
    pos: torch.Tensor  # [B, T]
    valid: torch.Tensor  # [B, T] bool
    cos: torch.Tensor
    sin: torch.Tensor
    all_valid: bool  # True when valid is all True (enables the flash/causal fast path)


class Attention(nn.Module):
    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        d, hd = cfg.hidden_size, cfg.head_dim
        self.n_heads, self.n_kv, self.hd = cfg.num_heads, cfg.num_kv_heads, hd
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)

    def project_kv(self, x: torch.Tensor, tb: TokenBatch) -> KVSite:
        b, t, _ = x.shape
        k = self.k_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv, self.hd).transpose(1, 2)
        return KVSite(apply_rotary(k, tb.cos, tb.sin), v, tb.pos, tb.valid)

    def forward(
        self, x: torch.Tensor, tb: TokenBatch, past: KVSite | None, reuse: KVSite | None
    ) -> tuple[torch.Tensor, KVSite | None]:
        """Attend from ``x`` to (past + own keys), or to ``reuse`` (recursive KV sharing).

        Returns the output and the site to store (None when keys were reused, not computed).
        """
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.hd).transpose(1, 2)
        q = apply_rotary(q, tb.cos, tb.sin)
        if reuse is not None:
            kv, store = reuse, None
        else:
            new = self.project_kv(x, tb)
            kv = new if past is None else past.append(new)
            store = kv
        if past is None and reuse is None and tb.all_valid:
            # Plain causal self-attention over positions in order: flash-eligible fast path.
            out = F.scaled_dot_product_attention(q, kv.k, kv.v, is_causal=True, enable_gqa=True)
        else:
            mask = kv.valid[:, None, :] & (kv.pos[:, None, :] <= tb.pos[:, :, None])
            # Rows of invalid queries may see nothing; let them see everything (their output is
            # discarded) so softmax never produces NaN.
            mask = mask | ~mask.any(dim=-1, keepdim=True)
            out = F.scaled_dot_product_attention(
                q, kv.k, kv.v, attn_mask=mask[:, None], enable_gqa=True
            )
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.hd)
        return self.o_proj(out), store


class SwiGLU(nn.Module):
    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.ffn_size, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + Attn(norm(x)), then + MLP(norm(x))."""

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, tb: TokenBatch, past: KVSite | None = None, reuse: KVSite | None = None
    ) -> tuple[torch.Tensor, KVSite | None]:
        h, store = self.attn(self.attn_norm(tb.x), tb, past, reuse)
        x = tb.x + h
        return x + self.mlp(self.mlp_norm(x)), store
