"""One look for every figure of a report: a colour per model, axis labels with units, FLOPs
ticks, and the files a figure is saved as (PNG for screens, SVG for papers)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

DPI = 200
"""PNG resolution: print quality for a paper's single column."""
FRONT_COLOR = "#d62728"
"""The Pareto front's colour (tab10's red), which no model gets."""
_PALETTE = [
    # tab10 without its red, then tab20's lighter tones without theirs: 18 model colours.
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2", "#c7c7c7",
    "#dbdb8d", "#9edae5",
]  # fmt: skip


def model_colors(models: Iterable[Any]) -> dict[str, str]:
    """A colour per model name, by sorted name: the same model has the same colour in every
    figure of a report (the caller passes every model of the report, shown or not)."""
    names = sorted({str(m) for m in models if isinstance(m, str) and m})
    return {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(names)}


def metric_name(metric: str) -> str:
    """A metric as people say it ('average accuracy', 'held-out NLL')."""
    return {"average": "average accuracy", "nll": "held-out NLL"}.get(metric, metric)


def metric_label(metric: str) -> str:
    """An axis label with the unit: NLL in nats/token, bits per byte, accuracy as a fraction."""
    if metric in ("nll", "val_nll") or metric.endswith("/nll"):
        name = "validation NLL" if metric == "val_nll" else metric_name(metric)
        return f"{name} (nats/token)"
    if metric.endswith("/bits_per_byte"):
        return f"{metric.rsplit('/', 1)[0]}: bits per byte"
    if metric == "average" or metric.endswith(("/acc", "/acc_norm")):
        return f"{metric_name(metric)} (fraction correct)"
    if metric.endswith("/perplexity"):
        return f"{metric.rsplit('/', 1)[0]}: perplexity (per token)"
    return metric


def si(value: float, digits: int = 3) -> str:
    """A FLOPs count as people read it: 1.27e5 → '127k', 2e12 → '2T'."""
    if value == 0 or not math.isfinite(value):
        return f"{value:g}"
    exp = min(max(math.floor(math.log10(abs(value)) / 3), -1), 6)
    scaled = value / 10 ** (3 * exp)
    return f"{scaled:.{digits}g}{['m', '', 'k', 'M', 'G', 'T', 'P', 'E'][exp + 1]}"


def si_ticks(values: Iterable[float]) -> list[str]:
    """SI labels for a row of ticks, with as many digits as it takes to tell them apart
    (budgets a few per mille apart: '1.992T', '1.994T', not '2T' five times)."""
    values = list(values)
    for digits in range(3, 9):
        labels = [si(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


def flops_axis(ax: Any, values: Iterable[float], which: str = "x") -> None:
    """A FLOPs axis: log scale over a decade or more, else linear; about six labelled ticks
    either way, in SI units ('127k', '2G'), never an offset or a '1e9' corner label; a
    single value (every budget equal) sits in the middle of a ±5% range."""
    from matplotlib.ticker import LogLocator, MaxNLocator, NullFormatter

    axis = ax.xaxis if which == "x" else ax.yaxis
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v)) and v > 0]
    fmt = _SITicks()
    if vals and max(vals) / min(vals) >= 10:
        (ax.set_xscale if which == "x" else ax.set_yscale)("log")
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(fmt)
        axis.set_minor_formatter(NullFormatter())
        return
    if vals and max(vals) == min(vals):
        v = vals[0]
        (ax.set_xlim if which == "x" else ax.set_ylim)(v * 0.95, v * 1.05)
    elif vals:
        pad = (max(vals) - min(vals)) * 0.08
        (ax.set_xlim if which == "x" else ax.set_ylim)(min(vals) - pad, max(vals) + pad)
    axis.set_major_locator(MaxNLocator(nbins=6, min_n_ticks=4))
    axis.set_major_formatter(fmt)


def _SITicks() -> Any:
    """A matplotlib formatter of a whole row of ticks at once (``si_ticks``)."""
    from matplotlib.ticker import Formatter

    class SITicks(Formatter):
        def __call__(self, x: float, pos: int | None = None) -> str:
            return si(x)

        def format_ticks(self, values: Any) -> list[str]:
            return si_ticks(values)

    return SITicks()


def save(fig: Any, path: Path) -> Path:
    """``path`` (PNG, ``DPI``) and the same figure as SVG beside it; returns the PNG."""
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=DPI)
    fig.savefig(path.with_suffix(".svg"))
    plt.close(fig)
    return path
