"""Graph breaks and ``torch.compile`` on the CPU (issue #16).

    python -m benchmarks.compile_check [--quick] [--out DIR] [--threads N]

Writes ``DIR/compile_check.json`` and ``DIR/compile_check.md`` (default DIR: benchmarks/results):

1. graph breaks of the training forward (``torch._dynamo.explain``, packed batches: no
   padding, as the trainer feeds them) of a vanilla model and of middle-cycle MoR N_r = 3 with
   expert-choice and token-choice routing, each break with its reason and place; and whether
   ``torch.compile(fullgraph=True)`` captures the forward (and so one joint forward+backward
   graph) of the vanilla and expert-choice models.
2. (not with --quick) step time (forward + backward + AdamW) eager vs ``torch.compile``
   (inductor) for a small model, variants interleaved, and the compiled loss against eager.

CPU timings on a shared machine are distorted by whatever else runs there (other processes
only add time); the graph counts do not depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from benchmarks.common import (
    CPU_SHAPE,
    BenchResult,
    Column,
    interleaved,
    make_config,
    make_model,
    run_meta,
)
from mor.model import MoRModel

MICRO_SHAPE: dict[str, Any] = dict(
    vocab_size=512, hidden_size=64, num_heads=4, num_kv_heads=2, ffn_size=128, max_seq_len=64
)
VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("vanilla 4L", dict(num_layers=4)),
    (
        "MoR-EC N_r=3 (8L)",
        dict(num_layers=8, sharing="middle_cycle", num_recursions=3, router="expert_choice"),
    ),
    (
        "MoR-TC N_r=3 (8L)",
        dict(num_layers=8, sharing="middle_cycle", num_recursions=3, router="token_choice"),
    ),
]
# (graphs, breaks) of ``run_breaks`` (full shapes) run against the model of commit 0816d19,
# before the sync-free forward: ``git archive 0816d19 mor | tar -x -C old`` and
# PYTHONPATH=old:. — its forward read the device 5–35 times (``Tensor.item``, ``.tolist``,
# boolean indexing) and never compiled with fullgraph=True.
BEFORE = {"vanilla 4L": (7, 6), "MoR-EC N_r=3 (8L)": (36, 35), "MoR-TC N_r=3 (8L)": (17, 16)}


def _where(reason: Any) -> str:
    frame = reason.user_stack[-1] if reason.user_stack else None
    return f"{Path(frame.filename).name}:{frame.lineno}" if frame else "?"


def graph_breaks(model: MoRModel, x: torch.Tensor) -> dict[str, Any]:
    """Graphs, breaks and each distinct break (place, reason, times) of a training forward."""
    torch._dynamo.reset()
    ex = torch._dynamo.explain(lambda ids: model(ids, labels=ids).loss)(x)
    reasons = Counter(
        (_where(r), r.reason.splitlines()[0][:120]) for r in ex.break_reasons
    )  # fmt: skip
    return {
        "graphs": ex.graph_count,
        "breaks": ex.graph_break_count,
        "reasons": [{"where": w, "reason": r, "times": n} for (w, r), n in reasons.items()],
    }


def fullgraph_ok(model: MoRModel, x: torch.Tensor) -> str:
    """'yes' when ``torch.compile(fullgraph=True)`` captures the forward and its backward runs
    (dynamo + AOTAutograd, no code generation), else the error's first line."""
    torch._dynamo.reset()
    fn = torch.compile(lambda ids: model(ids, labels=ids).loss, fullgraph=True, backend="aot_eager")
    try:
        fn(x).backward()
    except Exception as exc:  # report, don't stop the other measurements
        return f"no: {str(exc).splitlines()[0][:160]}"
    finally:
        model.zero_grad(set_to_none=True)
    return "yes"


def run_breaks(quick: bool) -> BenchResult:
    t0 = time.perf_counter()
    shape = MICRO_SHAPE if quick else CPU_SHAPE
    res = BenchResult(
        1,
        "graph_breaks",
        "Graph breaks of the training forward (torch._dynamo.explain)",
        [
            Column("variant", "variant"),
            Column("before", "graphs / breaks before (0816d19)"),
            Column("graphs", "graphs"),
            Column("breaks", "breaks"),
            Column("fullgraph", "fullgraph=True fwd+bwd"),
            Column("reasons_md", "remaining breaks (place: reason × times)"),
        ],
    )
    x = torch.randint(0, shape["vocab_size"], (2, 32), generator=torch.Generator().manual_seed(0))
    for name, fields in VARIANTS:
        model = make_model(make_config(shape, **fields)).train()
        row: dict[str, Any] = {"variant": name, "before": "{} / {}".format(*BEFORE[name])}
        row.update(graph_breaks(model, x))
        row["fullgraph"] = fullgraph_ok(model, x) if "TC" not in name else "–"
        row["reasons_md"] = (
            "; ".join(f"{r['where']}: {r['reason']} × {r['times']}" for r in row["reasons"])
            or "none"
        )
        res.rows.append(row)
        res.summary[f"graphs {name}"] = row["graphs"]
    res.notes += [
        "Training forward (model.train(), labels given, no attention_mask: packed batches, as "
        "the trainer feeds them), batch 2 × 32 tokens. 'Before' is the same count on commit "
        "0816d19, before the sync-free forward (issue #16).",
        "Token-choice: each token picks its depth, so recursions r ≥ 2 hold a different "
        "number of tokens per row; the gather's width is read from the device once per such "
        "recursion (mor/model.py `_recursion`), a graph break by design. A break inside a "
        "nested call also splits its callers, hence more graphs than breaks' places.",
        "fullgraph: torch.compile(fullgraph=True, backend='aot_eager') of the forward, then "
        "backward through it (AOTAutograd's joint graph).",
    ]
    res.seconds = time.perf_counter() - t0
    return res


def _train_step(model: MoRModel, opt: torch.optim.Optimizer, x: torch.Tensor, losses: list):
    def step() -> None:
        out = model(x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()
        losses.append(out.loss.detach())

    return step


def run_speed() -> BenchResult:
    """Eager vs compiled (inductor) training step of each variant, interleaved."""
    t0 = time.perf_counter()
    fns, losses, compile_s = {}, {}, {}
    x = torch.randint(
        0, CPU_SHAPE["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(1)
    )
    for name, fields in VARIANTS[:2]:
        cfg = make_config(CPU_SHAPE, **fields)
        for mode in ("eager", "compiled"):
            model = make_model(cfg).train()
            if mode == "compiled":
                torch._dynamo.reset()
                model.compile()
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
            key = f"{name} {mode}"
            losses[key] = []
            fns[key] = _train_step(model, opt, x, losses[key])
            if mode == "compiled":  # the first call compiles: time it apart
                c0 = time.perf_counter()
                fns[key]()
                compile_s[key] = time.perf_counter() - c0
    times = interleaved(fns, reps=6, warmup=1)
    res = BenchResult(
        2,
        "compile_speed",
        "Training step eager vs torch.compile (inductor), CPU",
        [
            Column("variant", "variant"),
            Column("eager_ms", "eager step (ms)", "{:.1f}"),
            Column("compiled_ms", "compiled step (ms)", "{:.1f}"),
            Column("speedup", "speed-up", "{:.2f}×"),
            Column("compile_s", "first compiled step (s)", "{:.0f}"),
            Column("max_loss_diff", "max |loss compiled − eager|", "{:.2e}"),
        ],
    )
    for name, _ in VARIANTS[:2]:
        e, c = min(times[f"{name} eager"]), min(times[f"{name} compiled"])
        le, lc = losses[f"{name} eager"], losses[f"{name} compiled"]
        # Same seed, same batch, same optimizer: the two runs step through the same losses
        # (each list starts at the untrained model: eager's warm-up, compiled's compile step).
        diff = max(abs(float(a) - float(b)) for a, b in zip(le, lc))
        res.rows.append(
            {
                "variant": name,
                "eager_ms": e * 1e3,
                "compiled_ms": c * 1e3,
                "speedup": e / c,
                "compile_s": compile_s[f"{name} compiled"],
                "max_loss_diff": diff,
            }
        )
        res.summary[f"speed-up {name}"] = e / c
    res.notes += [
        "Batch 8 × 128 tokens, forward + backward + AdamW; fastest of 6 interleaved steps "
        "after 1 warm-up; the compiled model's first (compiling) step is timed apart. It "
        "reads inductor's on-disk cache (/tmp/torchinductor_$USER) when a previous run left "
        "one: then seconds; cold on this loaded 2-core machine it took minutes (187 s vanilla, "
        "489 s MoR-EC on 2026-12-02).",
        "Loss difference: eager and compiled models start from the same weights and train on "
        "the same batch; compared step by step (float32, CPU).",
        "CPU timings on a shared machine: other processes only add time, so ratios are "
        "indicative and the absolute times are not the machine's best.",
    ]
    res.seconds = time.perf_counter() - t0
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="micro shapes, no compiled timing")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = [run_breaks(args.quick)]
    if not args.quick:
        results.append(run_speed())
    doc = write(Path(args.out), results, args.quick)
    print(f"[compile_check] wrote {args.out}/compile_check.json and .md")
    failed = [r for r in doc["benchmarks"][0]["rows"] if r["fullgraph"] not in ("yes", "–")]
    return 1 if failed else 0


def write(out: Path, results: list[BenchResult], quick: bool) -> dict[str, Any]:
    meta = run_meta(quick)
    doc = {"schema_version": 1, "meta": meta, "benchmarks": [r.to_dict() for r in results]}
    head = (
        f"# torch.compile check ({'quick' if quick else 'full'} run, {meta['created']}; torch "
        f"{meta['torch']}, {meta['torch_threads']} thread(s), {meta['cpu_count']} CPUs, "
        f"{meta['machine']}; a shared machine: timings distorted by other work)"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "compile_check.json").write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    (out / "compile_check.md").write_text(
        "\n".join([head, "", *(r.to_markdown() for r in results)])
    )
    return doc


if __name__ == "__main__":
    sys.exit(main())
