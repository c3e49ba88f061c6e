"""Shared pieces of the benchmarks: result records, side-by-side timing, model builders, tables.

Every benchmark measures its variants in ONE run and interleaves them (round-robin repetitions,
fastest run: other processes on a shared machine only ever add time), so the ratios it reports
survive a noisy machine better than absolute times do.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from mor.config import MoRConfig, build_config
from mor.model import MoRModel

# The CPU shape family of the speed benchmarks: a small Llama-style model whose layers (not the
# LM head or Python overhead) dominate a training step. 4 unique layers in every pairing.
CPU_SHAPE: dict[str, Any] = dict(
    vocab_size=2048, hidden_size=256, num_heads=4, num_kv_heads=2, ffn_size=688, max_seq_len=128
)


@dataclass
class Column:
    key: str
    header: str
    fmt: str = "{}"


@dataclass
class BenchResult:
    """One benchmark's table (rows), its headline ratios (summary) and how it was measured."""

    id: int
    key: str
    title: str
    columns: list[Column]
    rows: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "key": self.key,
            "title": self.title,
            "columns": [c.key for c in self.columns],
            "headers": [c.header for c in self.columns],
            "rows": [_clean(r) for r in self.rows],
            "summary": _clean(self.summary),
            "notes": self.notes,
            "seconds": round(self.seconds, 2),
            "skipped": self.skipped,
        }

    def to_markdown(self) -> str:
        out = [f"### {self.id}. {self.title}", ""]
        if self.skipped:
            return "\n".join([*out, f"_Skipped: {self.skipped}_", ""])
        out.append("| " + " | ".join(c.header for c in self.columns) + " |")
        out.append("|" + "|".join(" --- " for _ in self.columns) + "|")
        for row in self.rows:
            cells = [_fmt(c.fmt, row.get(c.key)) for c in self.columns]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
        if self.summary:
            parts = [f"{k} = **{_fmt('{:.3g}', v)}**" for k, v in self.summary.items()]
            out += ["Ratios: " + "; ".join(parts) + ".", ""]
        out += [f"- {n}" for n in self.notes]
        out += [f"- ({self.seconds:.0f} s)", ""]
        return "\n".join(out)


def _fmt(fmt: str, value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def _clean(obj: Any) -> Any:
    """JSON-safe: floats rounded to 6 significant digits, NaN/inf as None."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, float):
        return float(f"{obj:.6g}") if math.isfinite(obj) else None
    return obj


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(
    fns: dict[str, Callable[[], Any]],
    reps: int,
    warmup: int = 1,
    device: torch.device | str = "cpu",
) -> dict[str, list[float]]:
    """Seconds of each call, variants run round-robin (warm-up calls are not timed)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def make_config(shape: dict[str, Any], **fields: Any) -> MoRConfig:
    return build_config(None, **{**shape, **fields})


def make_model(
    cfg: MoRConfig,
    seed: int = 0,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    router_std: float | None = None,
) -> MoRModel:
    """A randomly initialised model; ``router_std`` re-initialises the router weights (a larger
    value makes the untrained inference router split tokens decisively across depths)."""
    torch.manual_seed(seed)
    model = MoRModel(cfg)
    if router_std is not None and model.router is not None:
        for p in model.router.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=router_std)
    return model.to(device=device, dtype=dtype)


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def run_meta(quick: bool, device: str = "cpu") -> dict[str, Any]:
    """When and where a benchmark ran: the ``meta`` of every results file."""
    import os
    import platform
    import sys
    from datetime import datetime, timezone

    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "device": device,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "machine": platform.machine(),
    }
