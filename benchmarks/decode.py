"""Benchmarks 2 and 3: decode throughput (depth-wise batching vs naive vs vanilla) and KV bytes.

2. Greedy generation of a queue of requests (different prompt lengths and max_new_tokens) with
   at most B sequences in flight. Vanilla and MoR each run (a) ``naive_generate``: static
   batches through the model's own forward, recursion after recursion, and (b) the
   ``DepthwiseBatchingEngine``: continuous batching, one shared-block pass per step over tokens
   at any depth (for a vanilla model: plain continuous batching). Throughput = generated
   tokens / wall time, prefill included. Pairing: the paper's (Fig. 4a): the same unrolled
   depth L, MoR with N_r = 3 middle-cycle sharing and expert-choice routing.
3. KV-cache bytes after decoding (valid entries only) measured in the model's ``KVCache`` and in
   the engine's storage, vs ``kv_cache_bytes_per_token`` × tokens with the measured fractions.
"""

from __future__ import annotations

import random
import time
from typing import Any

import torch

from benchmarks.common import (
    CPU_SHAPE,
    BenchResult,
    Column,
    interleaved,
    make_config,
    make_model,
    ratio,
)
from mor.engine import DepthwiseBatchingEngine
from mor.flops import kv_cache_bytes_per_token
from mor.generation import naive_generate

# 4 shared layers per recursion around a unique first and last layer: like the paper's models,
# the recursion block (not the unique layers) holds most of the depth.
MOR3 = dict(num_layers=14, sharing="middle_cycle", num_recursions=3, router="expert_choice")
VANILLA = dict(num_layers=14)


def make_requests(
    n: int, vocab: int, prompt: tuple[int, int], new: tuple[int, int], seed: int = 0
) -> tuple[list[list[int]], list[int]]:
    """n random prompts with lengths in ``prompt`` and max_new_tokens in ``new`` (inclusive)."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(*prompt))] for _ in range(n)]
    return prompts, [rng.randint(*new) for _ in range(n)]


def _engine_fn(model: Any, prompts: list, news: list, slots: int, out: dict, key: str) -> Any:
    max_len = max(len(p) + m for p, m in zip(prompts, news))

    def go() -> None:
        eng = DepthwiseBatchingEngine(model, max_slots=slots, max_len=max_len)
        for p, m in zip(prompts, news):
            eng.submit(p, m)
        out[key] = (list(eng.run().values()), eng)

    return go


def _naive_fn(model: Any, prompts: list, news: list, slots: int, out: dict, key: str) -> Any:
    def go() -> None:
        res = naive_generate(model, prompts, news, batch_size=slots)
        out[key] = (res.outputs, res)

    return go


def run_decode(
    quick: bool = False,
    shape: dict[str, Any] | None = None,
    vanilla: dict[str, Any] | None = None,
    mor: dict[str, Any] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    prompt: tuple[int, int] = (8, 32),
    new: tuple[int, int] | None = None,
    requests_per_slot: int = 2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    reps: int | None = None,
) -> BenchResult:
    t_start = time.perf_counter()
    shape, vanilla, mor = shape or CPU_SHAPE, vanilla or VANILLA, mor or MOR3
    batch_sizes = batch_sizes or ((1, 4, 16) if not quick else (1, 8))
    new = new or ((8, 24) if quick else (16, 48))
    reps = reps or (1 if quick else 3)
    max_len = prompt[1] + new[1]
    models = {
        "vanilla": make_model(make_config(shape, max_seq_len=max_len, **vanilla), device=device,
                              dtype=dtype).eval(),
        "MoR": make_model(make_config(shape, max_seq_len=max_len, **mor), device=device,
                          dtype=dtype).eval(),
    }  # fmt: skip
    res = BenchResult(
        2,
        "decode",
        "Decode throughput: continuous depth-wise batching vs naive batching vs vanilla",
        [
            Column("batch", "B (slots)"),
            Column("requests", "requests"),
            Column("variant", "variant"),
            Column("tok_s", "tokens/s", "{:.0f}"),
            Column("vs_vanilla", "÷ vanilla naive", "{:.2f}"),
            Column("vs_vanilla_engine", "÷ vanilla cont.", "{:.2f}"),
            Column("mean_depth", "mean depth", "{:.2f}"),
            Column("calls", "model calls / engine steps"),
            Column("agree", "same tokens as naive"),
        ],
    )
    for b in batch_sizes:
        n_req = max(4, requests_per_slot * b)
        prompts, news = make_requests(n_req, shape["vocab_size"], prompt, new, seed=b)
        outs: dict[str, Any] = {}
        fns = {}
        for mname, model in models.items():
            fns[f"{mname} naive"] = _naive_fn(model, prompts, news, b, outs, f"{mname} naive")
            key = f"{mname} continuous" if mname == "vanilla" else f"{mname} depth-wise"
            fns[key] = _engine_fn(model, prompts, news, b, outs, key)
        times = interleaved(fns, reps=reps, warmup=1 if b == batch_sizes[0] else 0, device=device)
        tokens = sum(news)
        tps = {k: tokens / min(v) for k, v in times.items()}
        for key, t in tps.items():
            outputs, obj = outs[key]
            ref = outs[key.split()[0] + " naive"][0]
            eng = isinstance(obj, DepthwiseBatchingEngine)
            row = {
                "batch": b,
                "requests": n_req,
                "variant": key,
                "tok_s": t,
                "vs_vanilla": ratio(t, tps["vanilla naive"]),
                "vs_vanilla_engine": ratio(t, tps["vanilla continuous"]),
                "mean_depth": obj.stats.mean_depth() if eng else _naive_depth(obj),
                "calls": obj.stats.steps if eng else obj.forwards,
                "agree": outputs == ref,
                "active": obj.stats.active_fractions(False) if eng else obj.active_fractions(),
                "prompt_tokens": sum(map(len, prompts)),
                "times_s": [round(x, 4) for x in times[key]],
                "tokens": tokens,
            }
            res.rows.append(row)
        res.summary[f"MoR depth-wise ÷ vanilla naive (B={b})"] = ratio(
            tps["MoR depth-wise"], tps["vanilla naive"]
        )
        res.summary[f"MoR depth-wise ÷ MoR naive (B={b})"] = ratio(
            tps["MoR depth-wise"], tps["MoR naive"]
        )
        res.summary[f"MoR depth-wise ÷ vanilla continuous (B={b})"] = ratio(
            tps["MoR depth-wise"], tps["vanilla continuous"]
        )
    res.notes += [
        "Pairing (paper Fig. 4a): same unrolled depth; vanilla "
        f"{vanilla.get('num_layers')} layers vs MoR {mor.get('sharing')} N_r="
        f"{mor.get('num_recursions')} {mor.get('router')} (recursion-wise KV), untrained "
        "weights: the inference router (logit > 0) splits tokens by chance, see mean depth.",
        f"Requests: max({4}, {requests_per_slot}·B), prompts {prompt[0]}–{prompt[1]} tokens, "
        f"max_new_tokens {new[0]}–{new[1]}, no eos; tokens/s = generated tokens / wall time "
        f"(prefill included), fastest of {reps} interleaved runs; dtype {dtype}.",
        "naive = static batches of B through the model's forward with a KVCache (each "
        "recursion gathers its active tokens); continuous/depth-wise = mor.engine.",
    ]
    res.seconds = time.perf_counter() - t_start
    return res


def _naive_depth(obj: Any) -> float:
    return float(sum(obj.active_fractions())) if obj.tokens else float("nan")


# ---------------------------------------------------------------------- 3. KV-cache bytes
KV_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla 14L", VANILLA),
    ("recursive N_r=3", dict(MOR3, router="none")),
    ("recursive N_r=3 shared", dict(MOR3, router="none", kv_cache="shared")),
    ("MoR-EC N_r=3", MOR3),
    ("MoR-EC N_r=3 shared", dict(MOR3, kv_cache="shared")),
    ("MoR-TC N_r=3", dict(MOR3, router="token_choice")),
    ("MoR-TC N_r=3 shared", dict(MOR3, router="token_choice", kv_cache="shared")),
]


VS_VANILLA = [
    ("naive_bytes", "vs_vanilla"),
    ("naive_alloc_bytes", "alloc_vs_vanilla"),
    ("engine_alloc_bytes", "engine_alloc_vs_vanilla"),
]


def run_kv(
    quick: bool = False,
    shape: dict[str, Any] | None = None,
    variants: list[tuple[str, dict[str, Any]]] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    prompt: tuple[int, int] = (8, 24),
    new: tuple[int, int] = (8, 16),
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> BenchResult:
    t_start = time.perf_counter()
    shape = shape or CPU_SHAPE
    variants = variants or KV_VARIANTS
    batch_sizes = batch_sizes or ((1, 4) if quick else (1, 4, 16))
    max_len = prompt[1] + new[1]
    res = BenchResult(
        3,
        "kv_cache",
        "KV-cache bytes after decoding: valid vs allocated, measured vs analytic",
        [
            Column("batch", "B"),
            Column("variant", "variant"),
            Column("kv_cache", "KV mode"),
            Column("active", "measured active fractions"),
            Column("naive_kib", "KVCache valid (KiB)", "{:.1f}"),
            Column("naive_alloc_kib", "KVCache allocated (KiB)", "{:.1f}"),
            Column("naive_alloc_over_valid", "KVCache alloc. ÷ valid", "{:.3f}"),
            Column("engine_peak_kib", "engine valid, peak (KiB)", "{:.1f}"),
            Column("engine_alloc_kib", "engine allocated (KiB)", "{:.1f}"),
            Column("engine_alloc_over_valid", "engine alloc. ÷ valid", "{:.3f}"),
            Column("measured_over_analytic", "valid ÷ analytic", "{:.4f}"),
            Column("vs_vanilla", "valid ÷ vanilla", "{:.3f}"),
            Column("alloc_vs_vanilla", "KVCache alloc. ÷ vanilla's", "{:.3f}"),
            Column("engine_alloc_vs_vanilla", "engine alloc. ÷ vanilla's", "{:.3f}"),
        ],
    )
    worst = worst_alloc = 0.0
    for b in batch_sizes:
        n_requests = max(8, 2 * b)
        prompts, news = make_requests(n_requests, shape["vocab_size"], prompt, new, seed=7)
        base: dict[str, Any] = {}
        for name, fields in variants:
            row = _kv_row(shape, fields, prompts, news, b, max_len, device, dtype)
            base = base or row
            worst = max(worst, abs(row["measured_over_analytic"] - 1), row.pop("_engine_err"))
            worst_alloc = max(
                worst_alloc, row["naive_alloc_over_valid"] - 1, row["engine_alloc_over_valid"] - 1
            )
            row.update(batch=b, variant=name, requests=n_requests)
            for key, col in VS_VANILLA:
                row[col] = ratio(row[key], base[key])
            res.rows.append(row)
    res.summary["max |measured ÷ analytic − 1|"] = worst
    res.summary["max allocated ÷ valid − 1"] = worst_alloc
    for row in res.rows:
        if row["batch"] == 4 and row["variant"] != variants[0][0]:
            res.summary[f"{row['variant']} ÷ vanilla (B=4)"] = row["vs_vanilla"]
            res.summary[f"{row['variant']} allocated ÷ vanilla (B=4)"] = row["alloc_vs_vanilla"]
    res.notes += _kv_notes(prompt, new, dtype)
    res.seconds = time.perf_counter() - t_start
    return res


def _kv_row(
    shape: dict, fields: dict, prompts: list, news: list, b: int, max_len: int, device: str,
    dtype: torch.dtype,
) -> dict[str, Any]:  # fmt: skip
    """One variant at batch b: the model's KVCache (naive) and the engine's pools."""
    cfg = make_config(shape, max_seq_len=max_len, **fields)
    model = make_model(cfg, device=device, dtype=dtype, router_std=0.5).eval()
    naive = naive_generate(model, prompts, news, batch_size=b)
    eng = DepthwiseBatchingEngine(model, max_slots=b, max_len=max_len)
    for p, m in zip(prompts, news):
        eng.submit(p, m)
    eng.run()
    fr = naive.active_fractions()
    elem = torch.empty(0, dtype=dtype).element_size()
    analytic = kv_cache_bytes_per_token(cfg, active_fractions=fr, bytes_per_element=elem)
    analytic *= naive.tokens
    peak, alloc = eng.kv_bytes(peak=True), eng.kv_allocated_bytes(peak=True)
    return {
        "kv_cache": cfg.kv_cache,
        "tokens": naive.tokens,
        "active": "/".join(f"{a:.2f}" for a in fr),
        "naive_kib": naive.kv_bytes / 1024,
        "naive_alloc_kib": naive.kv_alloc_bytes / 1024,
        "naive_alloc_over_valid": ratio(naive.kv_alloc_bytes, naive.kv_bytes),
        "engine_peak_kib": peak / 1024,
        "engine_alloc_kib": alloc / 1024,
        "engine_alloc_over_valid": ratio(alloc, peak),
        "measured_over_analytic": ratio(naive.kv_bytes, analytic),
        "naive_bytes": naive.kv_bytes,
        "naive_alloc_bytes": naive.kv_alloc_bytes,
        "engine_bytes": eng.stats.kv_bytes_finished,
        "engine_peak_bytes": peak,
        "engine_alloc_bytes": alloc,
        "analytic_bytes": analytic,
        "_engine_err": abs(ratio(eng.stats.kv_bytes_finished, analytic) - 1),
    }


def _kv_notes(prompt: tuple[int, int], new: tuple[int, int], dtype: torch.dtype) -> list[str]:
    elem = torch.empty(0, dtype=dtype).element_size()
    return [
        f"max(8, 2·B) requests (prompts {prompt[0]}–{prompt[1]}, max_new_tokens "
        f"{new[0]}–{new[1]}); the cache holds every prompt token and every fed-back token (all "
        "generated tokens but the last).",
        "KVCache (mor.generation.naive_generate: static batches of B): valid = entries "
        "attention can see, allocated = every byte its sites hold between steps (keys, values, "
        "positions, row indices: mor.kvcache.PackedSite), both at the end of each static batch "
        "(the caches only grow), summed over batches. Before the packed layout the dense "
        "per-site tensors allocated 0.98 of vanilla for 0.70 valid (MoR-EC, B=4, issue #16).",
        "engine (mor.engine, B slots, continuous batching): valid = the most entries in use at "
        "once (per pool), allocated = the pools' largest capacity (entries in use + free-list "
        "slack, growth by 1/16) + page tables; before the pools every site preallocated "
        "max_len entries per slot (1.00 of vanilla).",
        "analytic = mor.flops.kv_cache_bytes_per_token(cfg, measured active fractions) × "
        "tokens (valid entries). Routers: untrained, weights std 0.5.",
        f"Same shape as benchmark 2; {dtype} ({elem} bytes per element).",
    ]
