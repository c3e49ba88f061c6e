"""Benchmark 6: loglikelihood throughput of the lm-eval backend (``evals.lm_backend.MoRLM``).

The public ``loglikelihood`` API (tokenisation included) on (context, continuation) pairs cut
from the embedded corpus, with a byte-level BPE trained here (``trainers.tokenizer.train_bpe``),
at several batch sizes, for a vanilla and an MoR model of the same unrolled depth.
"""

from __future__ import annotations

import random
import time
from typing import Any

from benchmarks.common import CPU_SHAPE, BenchResult, Column, make_config, make_model
from benchmarks.decode import MOR3, VANILLA


def build_tokenizer(vocab_size: int = 1024, docs: int = 120) -> tuple[Any, list[str]]:
    """A BPE trained on the first ``docs`` documents of the embedded corpus, and those texts."""
    from mor.corpus import default_corpus_documents
    from trainers.tokenizer import train_bpe

    texts = default_corpus_documents()[:docs]
    return train_bpe(texts, vocab_size), texts


def make_pairs(texts: list[str], n: int, seed: int = 0) -> list[tuple[str, str]]:
    """(context, continuation) pairs: a 20–80-word window, then the next 1–6 words."""
    rng = random.Random(seed)
    words = " ".join(texts).split()
    pairs = []
    for _ in range(n):
        ctx_len, cont_len = rng.randint(20, 80), rng.randint(1, 6)
        start = rng.randrange(0, len(words) - ctx_len - cont_len)
        ctx = " ".join(words[start : start + ctx_len])
        cont = " " + " ".join(words[start + ctx_len : start + ctx_len + cont_len])
        pairs.append((ctx, cont))
    return pairs


def run(
    quick: bool = False,
    shape: dict[str, Any] | None = None,
    variants: list[tuple[str, dict[str, Any]]] | None = None,
    batch_sizes: tuple[int, ...] | None = None,
    n_requests: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
) -> BenchResult:
    from lm_eval.api.instance import Instance

    from evals.lm_backend import MoRLM

    t_start = time.perf_counter()
    batch_sizes = batch_sizes or ((1, 4, 16) if not quick else (1, 16))
    n_requests = n_requests or (32 if quick else 64)
    variants = variants or [("vanilla 14L", VANILLA), ("MoR-EC N_r=3 (14L)", MOR3)]
    tok, texts = build_tokenizer()
    shape = dict(shape or CPU_SHAPE, vocab_size=tok.get_vocab_size(), max_seq_len=256)
    pairs = make_pairs(texts, n_requests)
    reqs = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    lms = {}
    for name, fields in variants:
        model = make_model(make_config(shape, **fields), device=device)
        lms[name] = MoRLM(model=model, tokenizer=tok, device=device, dtype=dtype)
    n_tokens = sum(len(tok.encode(c + x).ids) for c, x in pairs)
    reps = 1 if quick else 2
    times: dict[tuple[str, int], list[float]] = {}
    scores: dict[tuple[str, int], list[float]] = {}
    for lm in lms.values():  # warm-up
        lm.batch_size = batch_sizes[-1]
        lm.loglikelihood(reqs[: batch_sizes[-1]], disable_tqdm=True)
    for _ in range(reps):
        for bs in batch_sizes:
            for name, lm in lms.items():
                lm.batch_size = bs
                t0 = time.perf_counter()
                out = lm.loglikelihood(reqs, disable_tqdm=True)
                times.setdefault((name, bs), []).append(time.perf_counter() - t0)
                scores[(name, bs)] = [s for s, _ in out]
    res = BenchResult(
        6,
        "lm_eval",
        "lm-eval backend loglikelihood throughput",
        [
            Column("variant", "model"),
            Column("batch", "batch size"),
            Column("req_s", "requests/s", "{:.1f}"),
            Column("tok_s", "tokens/s", "{:.0f}"),
            Column("vs_bs1", "÷ batch 1", "{:.2f}"),
            Column("vs_vanilla", "÷ vanilla", "{:.2f}"),
            Column("max_score_diff", "largest score change vs batch 1", "{:.1e}"),
        ],
    )
    for name in lms:
        base = min(times[(name, batch_sizes[0])])
        for bs in batch_sizes:
            t = min(times[(name, bs)])
            diff = max(
                abs(a - b) for a, b in zip(scores[(name, bs)], scores[(name, batch_sizes[0])])
            )
            vt = min(times[(variants[0][0], bs)])
            res.rows.append(
                {
                    "variant": name,
                    "batch": bs,
                    "req_s": n_requests / t,
                    "tok_s": n_tokens / t,
                    "vs_bs1": base / t,
                    "vs_vanilla": vt / t,
                    "max_score_diff": diff,
                    "times_s": [round(x, 4) for x in times[(name, bs)]],
                }
            )
            if bs != batch_sizes[0]:
                res.summary[f"{name} batch {bs} ÷ batch {batch_sizes[0]}"] = base / t
    res.notes += [
        f"{n_requests} requests (20–80-word contexts, 1–6-word continuations from the embedded "
        f"corpus, {n_tokens} tokens in all), BPE vocabulary {tok.get_vocab_size()}, MoRLM "
        f"with routing stats tally; fastest of {reps} interleaved runs, {dtype}.",
        "Batching must not change scores (causal routing, padding never eligible): the last "
        "column is the largest score difference from batch size 1 (float rounding only). On "
        "one CPU thread a single ~120-token request already fills the matmuls, so batching "
        "adds padding and cache pressure rather than speed.",
    ]
    res.seconds = time.perf_counter() - t_start
    return res
