"""Generation through the model's own forward with the KV cache (inference routing, optional
depth cap): ``generate`` step by step, and ``naive_generate``, the static-batching baseline of
``mor.engine``'s depth-wise batching."""

from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass
class NaiveResult:
    """Outputs of ``naive_generate`` and what its caches held."""

    outputs: list[list[int]]
    kv_bytes: int = 0
    """Valid KV-cache bytes of each static batch at its end, summed."""
    kv_alloc_bytes: int = 0
    """KV-cache bytes allocated (``KVCache.num_bytes(valid_only=False)``), the same way."""
    tokens: int = 0
    """Valid tokens the model processed (prompts + fed-back tokens)."""
    active: list[float] = field(default_factory=list)
    """Tokens that ran each recursion."""
    forwards: int = 0

    def active_fractions(self) -> list[float]:
        return [a / max(1, self.tokens) for a in self.active]


@torch.no_grad()
def naive_generate(
    model: MoRModel, prompts: list[list[int]], max_new_tokens: int | list[int],
    batch_size: int = 8, eos_id: int | None = None, max_depth: int | None = None,
) -> NaiveResult:  # fmt: skip
    """Static batching with the model's own forward: left-padded prompts, ``KVCache``.

    Each step runs every unfinished row through the whole model, recursion after recursion
    (each recursion gathers its active tokens, so exited tokens still skip work, but the
    recursions of one step run one after another over a shrinking batch). Finished rows are
    masked out of routing and caches; the batch ends when its longest request does.
    """
    model.eval()
    dev = model.embed.weight.device
    limits = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else max_new_tokens
    res = NaiveResult(outputs=[], active=[0.0] * model.cfg.num_recursions)

    def tally(out: object, n_valid: int) -> None:
        res.tokens += n_valid
        res.forwards += 1
        stats = out.stats  # type: ignore[attr-defined]
        fr = stats.active_fraction if stats is not None else [1.0]
        res.active = [a + f * n_valid for a, f in zip(res.active, fr)]

    for start in range(0, len(prompts), batch_size):
        chunk, lim = prompts[start : start + batch_size], limits[start : start + batch_size]
        t = max(len(p) for p in chunk)
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, t - len(p) :] = torch.tensor(p)
            mask[b, t - len(p) :] = 1
        cache = KVCache()
        out = model(ids.to(dev), mask.to(dev), cache=cache, max_depth=max_depth)
        tally(out, int(mask.sum()))
        gen: list[list[int]] = [[] for _ in chunk]
        done = [False] * len(chunk)
        while True:
            nxt = out.logits[:, -1].argmax(-1).tolist()
            for b, tok in enumerate(nxt):
                if not done[b]:
                    gen[b].append(tok)
                    done[b] = len(gen[b]) >= lim[b] or (eos_id is not None and tok == eos_id)
            if all(done):
                break
            live = torch.tensor([[not d] for d in done], dtype=torch.long)
            out = model(torch.tensor(nxt)[:, None].to(dev), live.to(dev), cache=cache,
                        max_depth=max_depth)  # fmt: skip
            tally(out, int(live.sum()))
        res.kv_bytes += cache.num_bytes(valid_only=True)
        res.kv_alloc_bytes += cache.num_bytes(valid_only=False)
        res.outputs.extend(gen)
    return res
