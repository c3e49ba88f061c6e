"""Greedy / sampled generation with the KV cache (inference routing, optional depth cap)."""

from __future__ import annotations

import torch

from mor.model import KVCache, MoRModel


@torch.no_grad()
def generate(
    model: MoRModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    eos_id: int | None = None,
    max_depth: int | None = None,
    force_depth: int | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Extend each row of ``input_ids`` by up to ``max_new_tokens`` tokens.

    Prompts may be left-padded (``attention_mask`` 0 on padding). Returns only the new tokens,
    [B, max_new_tokens]; after a row emits ``eos_id`` it is filled with ``eos_id``.
    """
    was_training = model.training
    model.eval()
    try:
        cache = KVCache()
        depth = {"max_depth": max_depth, "force_depth": force_depth}
        out = model(input_ids, attention_mask=attention_mask, cache=cache, **depth)
        b = input_ids.shape[0]
        done = torch.zeros(b, dtype=torch.bool, device=input_ids.device)
        new_tokens = []
        logits = out.logits[:, -1]
        for _ in range(max_new_tokens):
            if temperature > 0:
                probs = torch.softmax(logits.float() / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
            else:
                nxt = logits.argmax(-1)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done = done | (nxt == eos_id)
            new_tokens.append(nxt)
            if eos_id is not None and bool(done.all()):
                break
            out = model(nxt[:, None], cache=cache, **depth)
            logits = out.logits[:, -1]
        return torch.stack(new_tokens, dim=1)
    finally:
        model.train(was_training)
