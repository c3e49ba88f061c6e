"""``mor inspect``: parameters, layer sharing, FLOPs and KV-cache size of a config.

    mor inspect PRESET [--config FILE.yaml] [key=value ...] [--seq-len N] [--json]
    mor inspect --list

The config is built exactly as training builds it (preset, then YAML file, then overrides;
``mor.config.build_config``). Parameters are counted on a model instantiated on the ``meta``
device, so even the 1.7B preset is instant; FLOPs come from ``mor.flops`` under the config's
expected routing (expert-choice capacities, or a balanced token-choice router).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mor.config import PRESETS, MoRConfig, build_config, preset_names

KV_MODES = ("recursion_wise", "shared")
BF16_BYTES = 2


def register(subparsers: argparse._SubParsersAction) -> None:
    from cli.help import add_command

    p = add_command(
        subparsers,
        "inspect",
        help="show parameters, layer sharing, FLOPs and KV-cache size of a config",
        description="Show parameters, layer sharing, FLOPs and KV-cache size of a config.\n\n"
        + __doc__.split("\n\n")[2].replace("``", "`"),
        example_lines=[
            "mor inspect --list",
            "mor inspect tiny-mor",
            "mor inspect smollm-360m sharing=cycle num_recursions=2 --seq-len 2048 --json",
        ],
    )
    p.add_argument(
        "items",
        nargs="*",
        metavar="PRESET|key=value",
        help="a preset name (see --list), then dotted overrides such as num_recursions=3",
    )
    p.add_argument("--config", metavar="FILE.yaml", help="YAML file applied after the preset")
    p.add_argument("--seq-len", type=int, help="sequence length for FLOPs (default max_seq_len)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--list", action="store_true", help="list the presets and exit")
    p.set_defaults(func=run, extra_dest="items")


# ----------------------------------------------------------------------------- report
def count_parameters(cfg: MoRConfig) -> dict[str, int]:
    """Unique parameter counts (shared layers once), from a model built on the meta device."""
    import torch

    from mor.model import MoRModel

    with torch.device("meta"):
        model = MoRModel(cfg)
    counts = model.num_parameters()
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    router = sum(p.numel() for p in model.router.parameters()) if model.router else 0
    return {
        "total": counts["total"],
        "embedding": counts["embedding"],
        "non_embedding": counts["non_embedding"],
        "per_layer": per_layer,
        "router": router,
        # What the unrolled depth would hold without sharing (a vanilla model of L layers).
        "unrolled_non_embedding": (
            counts["non_embedding"] + per_layer * (cfg.num_layers - cfg.num_unique_layers)
        ),
    }


def inspect_config(cfg: MoRConfig, seq_len: int | None = None) -> dict[str, Any]:
    """Everything ``mor inspect`` reports, as a JSON-ready dict."""
    from mor import flops

    n = cfg.max_seq_len if seq_len is None else seq_len
    fwd = flops.forward_flops_per_token(cfg, n)
    fwd_paper = flops.forward_flops_per_token(cfg, n, convention="paper")
    exact_by_depth = flops.inference_flops_by_depth(cfg, n)
    paper_by_depth = flops.inference_flops_by_depth(cfg, n, convention="paper")
    kv: dict[str, float | None] = {}
    for mode in KV_MODES:
        if mode == "shared" and cfg.sharing == "none":
            kv[mode] = None
        else:
            kv[mode] = flops.kv_cache_bytes_per_token(cfg, mode, bytes_per_element=BF16_BYTES)
    pre, suf = cfg.num_prefix_layers, cfg.num_suffix_layers
    return {
        "config": cfg.model_dump(mode="json"),
        "sharing": cfg.sharing,
        "num_recursions": cfg.num_recursions,
        "layer_map": cfg.layer_map,
        "num_unique_layers": cfg.num_unique_layers,
        "prefix_layers": cfg.layer_map[:pre],
        "recursion_layers": [cfg.recursion_layers(r) for r in range(cfg.num_recursions)],
        "suffix_layers": cfg.layer_map[len(cfg.layer_map) - suf :],
        "parameters": count_parameters(cfg),
        "seq_len": n,
        "expected_active_fractions": list(cfg.expected_active_fractions()),
        "flops_per_token": {
            "forward": fwd.to_dict(),
            "forward_paper": fwd_paper.to_dict(),
            "training": {
                "exact": flops.training_flops_per_token(cfg, n),
                "paper": flops.training_flops_per_token(cfg, n, convention="paper"),
            },
            "inference_by_depth": {
                str(d): {"exact": exact_by_depth[d].total, "paper": paper_by_depth[d].total}
                for d in exact_by_depth
            },
        },
        "kv_cache_bytes_per_token": kv,
        "kv_cache_dtype": "bf16",
    }


# ----------------------------------------------------------------------------- formatting
def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _flops(x: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("KFLOP", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.4g} {unit}"
    return f"{x:.4g} FLOP"


def _bytes(x: float | None) -> str:
    if x is None:
        return "n/a"
    return f"{x:,.0f} B ({x / 1024:.1f} KiB)"


def _layers(ids: list[int]) -> str:
    if not ids:
        return "-"
    if len(ids) > 2 and ids == list(range(ids[0], ids[-1] + 1)):
        return f"[{ids[0]}..{ids[-1]}]"
    return "[" + ", ".join(map(str, ids)) + "]"


def format_report(name: str, rep: dict[str, Any]) -> str:
    c = rep["config"]
    p = rep["parameters"]
    f = rep["flops_per_token"]
    rows: list[tuple[str, str]] = []

    def row(label: str = "", value: str = "") -> None:
        rows.append((label, value))

    title = f"mor inspect {name}: sharing={c['sharing']}, N_r={c['num_recursions']}, "
    title += f"router={c['router']}, kv_cache={c['kv_cache']}"
    row("shape", f"d={c['hidden_size']} L={c['num_layers']} heads={c['num_heads']}/"
        f"{c['num_kv_heads']} ffn={c['ffn_size']} vocab={c['vocab_size']}")  # fmt: skip
    row("layer map", str(rep["layer_map"]))
    block = [_layers(ids) for ids in rep["recursion_layers"]]
    row("unique layers", f"{rep['num_unique_layers']}  (prefix {_layers(rep['prefix_layers'])}, "
        f"recursions {' '.join(block)}, suffix {_layers(rep['suffix_layers'])})")  # fmt: skip
    row()
    row("parameters", "(unique: shared layers counted once)")
    row("  non-embedding", f"{_count(p['non_embedding'])}  ({p['non_embedding']:,})")
    row("  embedding", f"{_count(p['embedding'])}  ({p['embedding']:,})")
    row("  total", f"{_count(p['total'])}  ({p['total']:,})")
    if p["router"]:
        row("  of which router", f"{p['router']:,}")
    if rep["num_unique_layers"] != c["num_layers"]:
        row("  unrolled non-embedding", _count(p["unrolled_non_embedding"]))
    row()
    fractions = " ".join(f"{a:.3f}" for a in rep["expected_active_fractions"])
    row(f"FLOPs per token (seq_len {rep['seq_len']})", f"expected active fractions {fractions}")
    row("  training, exact (3 x fwd)", _flops(f["training"]["exact"]))
    row("  training, paper (fwd)", _flops(f["training"]["paper"]))
    fwd = f["forward"]
    row("  forward, exact", f"{_flops(fwd['total'])}  (layers {_flops(fwd['layers'])}, "
        f"attention {_flops(fwd['attention'])}, router {_flops(fwd['router'])}, "
        f"lm_head {_flops(fwd['lm_head'])})")  # fmt: skip
    row("  inference", "every token runs d recursions")
    for d, v in f["inference_by_depth"].items():
        row(f"    depth {d}", f"exact {_flops(v['exact'])}   paper {_flops(v['paper'])}")
    row()
    row("KV cache per token (bf16)", "")
    for mode, value in rep["kv_cache_bytes_per_token"].items():
        mark = "  *" if mode == c["kv_cache"] else ""
        row(f"  {mode}", _bytes(value) + mark)
    width = max(len(label) for label, _ in rows) + 2
    lines = [title, "-" * len(title)]
    lines += [f"{label:<{width}}{value}".rstrip() for label, value in rows]
    return "\n".join(lines)


def format_presets() -> str:
    lines = []
    for name in preset_names():
        p = PRESETS[name]
        extra = ""
        if p.get("sharing", "none") != "none":
            extra = f"  {p['sharing']} N_r={p['num_recursions']} router={p.get('router', 'none')}"
        lines.append(
            f"{name:<18} L={p['num_layers']:<3} d={p['hidden_size']:<5} "
            f"vocab={p['vocab_size']:<6} seq={p['max_seq_len']}{extra}"
        )
    return "\n".join(lines)


# ----------------------------------------------------------------------------- command
def run(args: argparse.Namespace) -> int:
    if args.list:
        if args.json:
            print(json.dumps({name: PRESETS[name] for name in preset_names()}, indent=2))
        else:
            print(format_presets())
        return 0
    preset: str | None = None
    overrides: list[str] = []
    for item in args.items:
        if "=" in item:
            overrides.append(item)
        elif preset is None and not overrides:
            preset = item
        else:
            raise ValueError(f"expected key=value after the preset name, got {item!r}")
    if preset is None and args.config is None:
        raise ValueError(
            f"preset: give a preset name or --config FILE.yaml; presets: {preset_names()}"
        )
    cfg = build_config(preset, args.config, overrides)
    rep = inspect_config(cfg, args.seq_len)
    name = preset or str(args.config)
    if args.json:
        print(json.dumps({"preset": preset, **rep}, indent=2))
    else:
        print(format_report(name, rep))
    return 0
