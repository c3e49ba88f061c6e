"""Benchmark 4: analytic FLOPs (mor/flops.py) vs torch.utils.flop_counter.FlopCounterMode.

Every sharing × router × KV-mode combination (plus MLP routers), one forward in training
routing and one in inference routing, each at full depth and capped at depth 1. The analytic
count uses the exact convention with dense attention (what the counter counts for SDPA) and
the active fractions the forward reports.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import BenchResult, Column, make_model, ratio
from mor.config import build_config
from mor.flops import active_fractions_from_stats, flop_counter_mapping, forward_flops_per_token

SDPA_MAPPING = flop_counter_mapping()


def combos() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [dict(sharing="none")]
    for sharing, router, kv in itertools.product(
        ["cycle", "sequence", "middle_cycle", "middle_sequence"],
        ["none", "expert_choice", "token_choice"],
        ["recursion_wise", "shared"],
    ):
        n_r = 2 if sharing.startswith("middle") else 3
        out.append(dict(sharing=sharing, router=router, kv_cache=kv, num_recursions=n_r))
    for router in ("expert_choice", "token_choice"):
        out.append(
            dict(sharing="middle_cycle", num_recursions=2, router=router, router_network="mlp")
        )
    return out


def count_forward(
    model: torch.nn.Module, ids: torch.Tensor, max_depth: int | None
) -> tuple[int, Any]:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=SDPA_MAPPING) as counter:
        out = model(ids, max_depth=max_depth)
    return counter.get_total_flops(), out


def run(
    quick: bool = False,
    preset: str = "micro",
    num_layers: int = 6,
    seq_len: int | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cases: list[dict[str, Any]] | None = None,
) -> BenchResult:
    t_start = time.perf_counter()
    res = BenchResult(
        4,
        "flops",
        "FLOPs accounting vs FlopCounterMode (one forward, every combination)",
        [
            Column("config", "sharing / router / KV"),
            Column("measured_mflops", "FlopCounterMode, train (MFLOPs)", "{:.2f}"),
            Column("active_eval", "active fractions (inference routing)"),
            Column("train", "predicted ÷ measured: train", "{:.4f}"),
            Column("eval", "eval", "{:.4f}"),
            Column("train_d1", "train, depth 1", "{:.4f}"),
            Column("eval_d1", "eval, depth 1", "{:.4f}"),
        ],
    )
    worst = 0.0
    for ov in cases or combos():
        kw = dict(ov)
        if seq_len is not None:
            kw["max_seq_len"] = seq_len
        cfg = build_config(preset, num_layers=num_layers, **kw)
        model = make_model(cfg, device=device, dtype=dtype)
        n = cfg.max_seq_len
        ids = torch.randint(0, cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        name = f"{cfg.sharing} / {cfg.router} / {cfg.kv_cache}"
        if cfg.router_network == "mlp":
            name += " (MLP router)"
        row: dict[str, Any] = {"config": name, "cases": [], "train_d1": None, "eval_d1": None}
        for mode, max_depth in itertools.product(("train", "eval"), (None, 1)):
            if quick and max_depth is not None:
                continue
            model.train(mode == "train")
            measured, out = count_forward(model, ids.to(device), max_depth)
            fr = active_fractions_from_stats(out.stats) if out.stats is not None else None
            fb = forward_flops_per_token(
                cfg, active_fractions=fr, max_depth=max_depth, attention="dense"
            )
            predicted = fb.total * n
            r = ratio(predicted, measured)
            worst = max(worst, abs(r - 1))
            row[mode + ("_d1" if max_depth else "")] = r
            if mode == "train" and max_depth is None:
                row["measured_mflops"] = measured / 1e6
            if mode == "eval" and max_depth is None:
                row["active_eval"] = "–" if fr is None else "/".join(f"{a:.2f}" for a in fr)
            row["cases"].append(
                {"mode": mode, "max_depth": max_depth, "active": fr, "predicted": predicted,
                 "measured": measured, "ratio": r}
            )  # fmt: skip
        res.rows.append(row)
    res.summary["max |predicted ÷ measured − 1|"] = worst
    res.summary["combinations"] = float(len(cases or combos()))
    res.notes += [
        f"Preset {preset!r} with {num_layers} unrolled layers, one sequence of the preset's "
        "max_seq_len tokens; N_r = 3 (cycle, sequence) or 2 (middle variants).",
        "Analytic: forward_flops_per_token(exact, attention='dense') × tokens; the CPU SDPA "
        "kernel is counted with torch's dense sdpa formula (custom_mapping).",
    ]
    res.seconds = time.perf_counter() - t_start
    return res
