"""GPU benchmarks at the paper's sizes: ``python -m benchmarks.gpu [--out DIR] [--only 1,2]``.

The CPU suite's measurements (``benchmarks.run``) at SmolLM-135M / 360M shapes in bf16 with
2048-token training sequences, with MFU from the device's peak dense bf16 FLOP/s (the table of
``trainers.step_metrics.peak_flops``). Sized for one H200 in well under 10 minutes
(about 5 expected):

1. training step (bf16 autocast, 8 × 2048 tokens): 360M vanilla 32L, vanilla 12L (the MoR's
   unique-parameter count), recursive and MoR (expert-/token-choice) middle-cycle N_r = 3, 32L;
   135M vanilla 30L, vanilla 16L and MoR-EC middle-cycle N_r = 2, 30L; MFU per variant
2. decode throughput (bf16) at B = 16, 64, 256: depth-wise MoR vs naive vs vanilla, 360M
3. KV-cache bytes, 360M, every KV mode
4. FLOPs vs FlopCounterMode, 360M shapes at 2048 tokens
6. lm-eval loglikelihood throughput, 360M, batch 1, 16, 64
(5, platform overhead, is the CPU suite's: it needs a Ray cluster rather than a bigger chip.)

``--smoke`` runs the same plan at toy sizes on the CPU (float32) to check the code paths.
Without a CUDA device (and without ``--smoke``) it exits with a message and status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import BenchResult, Column
from mor.config import preset_dict
from mor.flops import forward_flops_per_token

NO_GPU = (
    "benchmarks.gpu: no CUDA device is visible (torch.cuda.is_available() is False). "
    "Run it on a GPU machine, or run the CPU suite: python -m benchmarks.run "
    "(add --smoke to check this script's code paths on the CPU at toy sizes)."
)


def _shape(preset: str, smoke: bool) -> dict[str, Any]:
    if smoke:
        return dict(preset_dict("micro"), max_seq_len=128)
    shape = preset_dict(preset)
    shape.pop("num_layers")
    return shape


def _mc(n_l: int, n_r: int, router: str = "expert_choice", **kw: Any) -> dict[str, Any]:
    return dict(num_layers=n_l, sharing="middle_cycle", num_recursions=n_r, router=router, **kw)


def plans(smoke: bool) -> dict[str, Any]:
    """Sizes of every measurement (paper sizes, or toy sizes for --smoke)."""
    if smoke:
        l360, l135, u360, u135 = 8, 6, 4, 4  # unrolled / unique layers at toy scale
        return dict(
            shape360=_shape("", True),
            shape135=_shape("", True),
            l360=l360,
            l135=l135,
            u360=u360,
            u135=u135,
            batch=2,
            seq=64,
            decode_b=(2, 4),
            prompt=(4, 12),
            new=(4, 8),
            kv_req=6,
            kv_prompt=(4, 12),
            kv_new=(4, 8),
            flops_preset="micro",
            flops_seq=64,
            lm_b=(1, 4),
            lm_req=8,
        )
    return dict(
        shape360=_shape("smollm-360m", False),
        shape135=_shape("smollm-135m", False),
        l360=32,
        l135=30,
        u360=12,
        u135=16,
        batch=8,
        seq=2048,
        decode_b=(16, 64, 256),
        prompt=(64, 256),
        new=(64, 192),
        kv_req=16,
        kv_prompt=(64, 256),
        kv_new=(32, 64),
        flops_preset="smollm-360m",
        flops_seq=2048,
        lm_b=(1, 16, 64),
        lm_req=256,
    )


def peak_flops(device: str) -> float | None:
    from trainers.step_metrics import peak_flops as peak_for_name

    if not device.startswith("cuda"):
        return None
    return peak_for_name(torch.cuda.get_device_name(device))


def run_all(ids: list[int], smoke: bool) -> tuple[list[BenchResult], dict[str, Any]]:
    from benchmarks import decode, flops_check, lmeval_bench, train_step

    p = plans(smoke)
    device = "cpu" if smoke else "cuda"
    dtype = torch.float32 if smoke else torch.bfloat16
    peak = peak_flops(device)
    mor360, mor135 = _mc(p["l360"], 3), _mc(p["l135"], 2)
    steps: dict[int, list[Callable[[], BenchResult]]] = {
        1: [
            lambda: train_step.run(
                shape=p["shape360"],
                variants=[
                    (f"vanilla {p['l360']}L", dict(num_layers=p["l360"])),
                    (f"vanilla {p['u360']}L (MoR's unique params)", dict(num_layers=p["u360"])),
                    ("recursive N_r=3", _mc(p["l360"], 3, "none")),
                    ("MoR-EC N_r=3", mor360),
                    ("MoR-TC N_r=3", _mc(p["l360"], 3, "token_choice")),
                ],
                batch=p["batch"],
                seq_len=p["seq"],
                device=device,
                amp_dtype=None if smoke else torch.bfloat16,
                peak_flops=peak,
                pairing="360M shape. Pairing: the paper's (equal unrolled depth, vanilla has more "
                "parameters); the second row has the MoR's unique-parameter count.",
            ),
            lambda: train_step.run(
                shape=p["shape135"],
                variants=[
                    (f"vanilla {p['l135']}L", dict(num_layers=p["l135"])),
                    (f"vanilla {p['u135']}L (MoR's unique params)", dict(num_layers=p["u135"])),
                    ("MoR-EC N_r=2", mor135),
                ],
                batch=p["batch"],
                seq_len=p["seq"],
                device=device,
                amp_dtype=None if smoke else torch.bfloat16,
                peak_flops=peak,
                pairing="135M shape, pairing as for 360M.",
            ),
        ],
        2: [
            lambda: decode.run_decode(
                shape=p["shape360"],
                vanilla=dict(num_layers=p["l360"]),
                mor=mor360,
                batch_sizes=p["decode_b"],
                prompt=p["prompt"],
                new=p["new"],
                device=device,
                dtype=dtype,
                reps=2,
            )
        ],
        3: [
            lambda: decode.run_kv(
                shape=p["shape360"],
                variants=[
                    (f"vanilla {p['l360']}L", dict(num_layers=p["l360"])),
                    ("MoR-EC N_r=3", mor360),
                    ("MoR-EC N_r=3 shared", dict(mor360, kv_cache="shared")),
                    ("MoR-TC N_r=3", _mc(p["l360"], 3, "token_choice")),
                    ("MoR-TC N_r=3 shared", _mc(p["l360"], 3, "token_choice", kv_cache="shared")),
                ],
                n_requests=p["kv_req"],
                batch=8,
                prompt=p["kv_prompt"],
                new=p["kv_new"],
                device=device,
                dtype=dtype,
            )
        ],
        4: [
            lambda: flops_check.run(
                preset=p["flops_preset"],
                num_layers=p["l360"],
                seq_len=p["flops_seq"],
                device=device,
                dtype=dtype,
                cases=[
                    dict(sharing="none"),
                    dict(sharing="middle_cycle", num_recursions=3, router="none"),
                    dict(sharing="middle_cycle", num_recursions=3, router="expert_choice"),
                    dict(
                        sharing="middle_cycle",
                        num_recursions=3,
                        router="expert_choice",
                        kv_cache="shared",
                    ),
                    dict(sharing="middle_cycle", num_recursions=3, router="token_choice"),
                ],
            )
        ],
        6: [
            lambda: lmeval_bench.run(
                shape=p["shape360"],
                variants=[
                    (f"vanilla {p['l360']}L", dict(num_layers=p["l360"])),
                    ("MoR-EC N_r=3", mor360),
                ],
                batch_sizes=p["lm_b"],
                n_requests=p["lm_req"],
                device=device,
                dtype="float32" if smoke else "bfloat16",
            )
        ],
    }
    out: list[BenchResult] = []
    for i in ids:
        for k, fn in enumerate(steps[i]):
            print(f"[gpu-bench] {i}.{k + 1} ...", flush=True)
            try:
                res = fn()
            except Exception as exc:  # keep the other measurements
                traceback.print_exc()
                res = BenchResult(i, f"gpu{i}", f"benchmark {i}", [], skipped=f"error: {exc}")
            if i == 1:
                res.title += " — " + ("360M" if k == 0 else "135M") + " shape"
            if i == 2:
                _decode_mfu(res, p, peak, mor360)
            print(f"[gpu-bench] {i}.{k + 1} done in {res.seconds:.0f} s", flush=True)
            out.append(res)
    meta = {
        "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu (smoke)",
        "peak_flops": peak,
        "dtype": str(dtype),
        "smoke": smoke,
    }
    return out, meta


def _decode_mfu(res: BenchResult, p: dict[str, Any], peak: float | None, mor: dict) -> None:
    """≈ MFU of decoding: (prompt + generated tokens) × forward FLOPs per token at the mean
    context, with the measured active fractions, over the wall time."""
    from benchmarks.common import make_config

    if res.skipped or not peak:
        return
    res.columns.append(Column("mfu", "≈ MFU", "{:.2%}"))
    ctx = (sum(p["prompt"]) + sum(p["new"]) / 2) / 2
    for row in res.rows:
        fields = mor if row["variant"].startswith("MoR") else dict(num_layers=p["l360"])
        cfg = make_config(p["shape360"], **fields)
        fr = row["active"] if cfg.num_recursions > 1 else None
        per_tok = forward_flops_per_token(cfg, max(1, round(2 * ctx)), fr).total
        t = row["tokens"] / row["tok_s"]
        row["mfu"] = (row["prompt_tokens"] + row["tokens"]) * per_tok / t / peak


def main(argv: list[str] | None = None) -> int:
    from benchmarks.run import parse_only, write_results

    ap = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--out", default="benchmarks/results_gpu", help="output folder")
    ap.add_argument("--only", default="1,2,3,4,6", help="comma-separated benchmark numbers")
    ap.add_argument("--smoke", action="store_true", help="toy sizes on the CPU (code check)")
    args = ap.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        print(NO_GPU, file=sys.stderr)
        return 2
    ids = [i for i in parse_only(args.only) if i != 5]
    t0 = time.perf_counter()
    results, meta = run_all(ids, args.smoke)
    meta.update(
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        torch=torch.__version__,
        cpu_count=os.cpu_count(),
        total_seconds=round(time.perf_counter() - t0, 1),
    )
    head = (
        f"GPU benchmarks ({meta['device']}, {meta['dtype']}, {meta['created']}; torch "
        f"{meta['torch']}; {meta['total_seconds']:.0f} s in all)."
    )
    write_results(Path(args.out), meta, [r.to_dict() for r in results],
                  [r.to_markdown() for r in results], head)  # fmt: skip
    print(f"[gpu-bench] wrote {Path(args.out) / 'results.json'} ({meta['total_seconds']:.0f} s)")
    return 1 if any((r.skipped or "").startswith("error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
