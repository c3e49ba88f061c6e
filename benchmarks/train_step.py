"""Benchmark 1: training step time of MoR vs vanilla vs plain recursive, against analytic FLOPs.

Plain PyTorch steps (forward + backward + AdamW) of each variant, interleaved. The analytic
training FLOPs come from ``mor.flops.training_flops_per_token`` (exact convention, 3 × forward,
with the active fractions the routers actually produced in that step); the *routing overhead*
of a variant is its measured time ratio to the baseline divided by its FLOPs ratio: 1.0 means
it costs exactly what its FLOPs say, > 1 is time lost to gathering, scattering and routing.
"""

from __future__ import annotations

import contextlib
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
    sync,
)
from mor.flops import active_fractions_from_stats, training_flops_per_token

# Equal unique parameters: 4 unique layers everywhere. Vanilla has them as 4 layers; the
# middle-cycle recursive/MoR models unroll them to 2 + 2·N_r layers (first and last unique).
CPU_VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla 4L", dict(num_layers=4)),
    ("recursive N_r=2 (6L)", dict(num_layers=6, sharing="middle_cycle", num_recursions=2)),
    (
        "MoR-EC N_r=2 (6L)",
        dict(num_layers=6, sharing="middle_cycle", num_recursions=2, router="expert_choice"),
    ),
    (
        "MoR-TC N_r=2 (6L)",
        dict(num_layers=6, sharing="middle_cycle", num_recursions=2, router="token_choice"),
    ),
    ("recursive N_r=3 (8L)", dict(num_layers=8, sharing="middle_cycle", num_recursions=3)),
    (
        "MoR-EC N_r=3 (8L)",
        dict(num_layers=8, sharing="middle_cycle", num_recursions=3, router="expert_choice"),
    ),
]
CPU_PAIRING = (
    "Pairing: equal unique parameters (4 unique layers). Vanilla runs them once (4 layers); "
    "middle-cycle recursive and MoR models keep the first and last layer unique and apply the "
    "2 middle layers N_r times (2 + 2·N_r unrolled layers). Routing is the training routing "
    "(expert-choice top-k at capacities (N_r−r)/N_r; token-choice argmax)."
)


def run(
    quick: bool = False,
    shape: dict[str, Any] | None = None,
    variants: list[tuple[str, dict[str, Any]]] | None = None,
    batch: int = 8,
    seq_len: int = 128,
    device: str = "cpu",
    amp_dtype: torch.dtype | None = None,
    peak_flops: float | None = None,
    pairing: str = CPU_PAIRING,
) -> BenchResult:
    """Fastest step time of each variant; ratios against the first variant (the baseline)."""
    t_start = time.perf_counter()
    shape = shape or CPU_SHAPE
    variants = variants or (CPU_VARIANTS[:4] if quick else CPU_VARIANTS)
    reps, warmup = (3, 1) if quick else (6, 2)
    fns, info = {}, {}
    for name, fields in variants:
        cfg = make_config(shape, max_seq_len=max(seq_len, shape.get("max_seq_len", 0)), **fields)
        model = make_model(cfg, device=device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        gen = torch.Generator().manual_seed(1)
        x = torch.randint(0, cfg.vocab_size, (batch, seq_len), generator=gen).to(device)
        state: dict[str, Any] = {}
        fns[name] = _step_fn(model, opt, x, amp_dtype, state)
        info[name] = (cfg, model, state)
    times = interleaved(fns, reps=reps, warmup=warmup, device=device)

    res = BenchResult(
        1,
        "train_step",
        "Training step time vs analytic FLOPs (forward + backward + AdamW)",
        [
            Column("variant", "variant"),
            Column("unique_layers", "unique layers"),
            Column("params_m", "params (M, non-emb.)", "{:.2f}"),
            Column("active", "active fractions"),
            Column("gflops_step", "train GFLOPs/step", "{:.1f}"),
            Column("step_ms", "step (ms)", "{:.0f}"),
            Column("fwd_bwd_ms", "fwd+bwd (ms)", "{:.0f}"),
            Column("flops_ratio", "FLOPs ÷ base", "{:.2f}"),
            Column("fwd_bwd_ratio", "fwd+bwd time ÷ base", "{:.2f}"),
            Column("overhead", "routing overhead", "{:.2f}"),
        ],
    )
    if peak_flops:
        res.columns.append(Column("mfu", "MFU", "{:.1%}"))
    base_t = base_f = None
    for name, _ in variants:
        cfg, model, state = info[name]
        stats = state.get("stats")
        fr = active_fractions_from_stats(stats) if stats is not None else None
        flops = training_flops_per_token(cfg, seq_len, fr, convention="exact") * batch * seq_len
        t = min(times[name])
        fb = min(state["fwd_bwd"][warmup:])
        if base_t is None:
            base_t, base_f, base_fb = t, flops, fb
        row = {
            "variant": name,
            "unique_layers": cfg.num_unique_layers,
            "params_m": model.num_parameters()["non_embedding"] / 1e6,
            "active": "–" if fr is None else "/".join(f"{a:.2f}" for a in fr),
            "gflops_step": flops / 1e9,
            "step_ms": t * 1e3,
            "gflops_s": flops / t / 1e9,
            "fwd_bwd_ms": fb * 1e3,
            "time_ratio": ratio(t, base_t),
            "fwd_bwd_ratio": ratio(fb, base_fb),
            "flops_ratio": ratio(flops, base_f),
            "times_ms": [round(x * 1e3, 2) for x in times[name]],
        }
        row["overhead"] = ratio(row["fwd_bwd_ratio"], row["flops_ratio"])
        row["overhead_step"] = ratio(row["time_ratio"], row["flops_ratio"])
        if peak_flops:
            row["mfu"] = flops / t / peak_flops
        res.rows.append(row)
    for row in res.rows[1:]:
        res.summary[f"overhead {row['variant']}"] = row["overhead"]
    res.notes += [
        pairing,
        f"Batch {batch} × {seq_len} tokens; fastest of {reps} timed steps per variant after "
        f"{warmup} warm-up, variants interleaved (other processes only ever add time). FLOPs: "
        "mor.flops exact convention (3 × forward incl. LM head, causal attention) with the "
        "step's measured active fractions.",
        "Routing overhead = (forward + backward time ÷ the baseline's) ÷ (FLOPs ÷ the "
        "baseline's); the AdamW update (same parameters everywhere, not in the FLOPs) is "
        "timed in the step column only. 1.00 = the variant costs what its FLOPs say.",
        f"Shape: {_shape_str(shape)}.",
    ]
    res.seconds = time.perf_counter() - t_start
    return res


def _step_fn(
    model: torch.nn.Module,
    opt: torch.optim.Optimizer,
    x: torch.Tensor,
    amp_dtype: torch.dtype | None,
    state: dict[str, Any],
) -> Any:
    def step() -> None:
        ctx = (
            torch.autocast(x.device.type, dtype=amp_dtype)
            if amp_dtype is not None
            else contextlib.nullcontext()
        )
        sync(x.device)
        t0 = time.perf_counter()
        with ctx:
            out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        sync(x.device)
        state.setdefault("fwd_bwd", []).append(time.perf_counter() - t0)
        opt.step()
        state["stats"] = out.stats

    return step


def _shape_str(shape: dict[str, Any]) -> str:
    keys = ("hidden_size", "num_heads", "num_kv_heads", "ffn_size", "vocab_size")
    return ", ".join(f"{k}={shape[k]}" for k in keys if k in shape)
