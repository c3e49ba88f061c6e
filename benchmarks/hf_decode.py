"""Decode throughput of ``mor.engine`` against Hugging Face ``generate`` on the same weights.

``python -m benchmarks.hf_decode [--quick] [--out DIR]`` (needs the ``bench`` extra:
``pip install -e .[bench]``; ``transformers`` is never a runtime dependency of the platform).

A vanilla MoR model is converted to a ``LlamaForCausalLM`` (same layers, norms, rotary
convention, grouped-query attention and SwiGLU), and a queue of 2·B greedy requests (prompts of
different lengths, the same number of new tokens) is decoded side by side, interleaved in one
process, by
* HF ``generate``: static batches of B left-padded prompts, ``DynamicCache``, greedy;
* ``DepthwiseBatchingEngine`` on the vanilla model: continuous batching with B slots;
* ``DepthwiseBatchingEngine`` on a MoR model of the same unrolled depth (paper Fig. 4a:
  middle-cycle N_r = 3, expert-choice), whose decode FLOPs per token are below vanilla's.
The engine's tokens must equal HF's exactly (asserted). "In proportion to FLOPs" =
(MoR tokens/s ÷ vanilla engine tokens/s) ÷ (vanilla FLOPs ÷ MoR FLOPs per decode token at the
measured active fractions): 1.0 means MoR's speed-up is all its FLOP saving.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    CPU_SHAPE,
    BenchResult,
    Column,
    make_config,
    make_model,
    ratio,
    run_meta,
)
from benchmarks.decode import MOR3, VANILLA, make_requests
from mor.engine import DepthwiseBatchingEngine
from mor.flops import forward_flops_per_token
from mor.model import MoRModel


def to_llama(model: MoRModel) -> Any:
    """The same weights as a ``transformers.LlamaForCausalLM`` (a vanilla model only)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    c = model.cfg
    if c.sharing != "none" or c.router != "none":
        raise ValueError("model: only a vanilla model (sharing='none', router='none') converts")
    hf_cfg = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.ffn_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        max_position_embeddings=c.max_seq_len,
        rms_norm_eps=c.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": c.rope_base},
        tie_word_embeddings=c.tie_embeddings,
        attention_bias=False,
        mlp_bias=False,
        hidden_act="silu",
    )
    hf = LlamaForCausalLM(hf_cfg)
    sd = {"model.embed_tokens.weight": model.embed.weight, "model.norm.weight": model.norm.weight}
    sd["lm_head.weight"] = model.embed.weight if model.lm_head is None else model.lm_head.weight
    for i, layer in enumerate(model.layers):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = layer.attn_norm.weight
        sd[p + "post_attention_layernorm.weight"] = layer.mlp_norm.weight
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            sd[p + f"self_attn.{name}.weight"] = getattr(layer.attn, name).weight
        for name in ("gate_proj", "up_proj", "down_proj"):
            sd[p + f"mlp.{name}.weight"] = getattr(layer.mlp, name).weight
    missing, unexpected = hf.load_state_dict({k: v.detach() for k, v in sd.items()}, strict=False)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise RuntimeError(f"weight conversion: missing {missing}, unexpected {unexpected}")
    hf.generation_config.eos_token_id = None
    hf.generation_config.pad_token_id = 0
    return hf.to(dtype=model.embed.weight.dtype).eval()


def hf_generate(hf: Any, prompts: list[list[int]], new: int, batch: int) -> list[list[int]]:
    """Greedy ``generate`` over static batches of left-padded prompts."""
    out: list[list[int]] = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        t = max(map(len, chunk))
        ids = torch.zeros(len(chunk), t, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for b, p in enumerate(chunk):
            ids[b, t - len(p) :], mask[b, t - len(p) :] = torch.tensor(p), 1
        with torch.no_grad():
            gen = hf.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                do_sample=False, pad_token_id=0,
            )  # fmt: skip
        out += gen[:, t:].tolist()
    return out


def engine_generate(model: MoRModel, prompts: list, new: int, slots: int) -> tuple[list, Any]:
    eng = DepthwiseBatchingEngine(model, max_slots=slots, max_len=max(map(len, prompts)) + new)
    for p in prompts:
        eng.submit(p, new)
    return list(eng.run().values()), eng


def _timed(fns: dict[str, Any], reps: int) -> tuple[dict, dict]:
    """CPU seconds (``time.process_time``) and wall seconds of each call, variants round-robin
    after one untimed warm-up round. CPU time is what the ratios use: on an oversubscribed
    machine wall time also counts waiting for a core (single-threaded torch: CPU time ≈ work)."""
    for fn in fns.values():
        fn()
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    wall: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            c0, w0 = time.process_time(), time.perf_counter()
            fn()
            cpu[name].append(time.process_time() - c0)
            wall[name].append(time.perf_counter() - w0)
    return cpu, wall


def _variants(
    hf: Any, vanilla: MoRModel, mor: MoRModel, prompts: list, new: int, b: int, outs: dict
) -> dict[str, Any]:
    """The three decoders as timed callables (each stores its outputs in ``outs``)."""

    def hf_fn() -> None:
        outs["hf"] = hf_generate(hf, prompts, new, b)

    def vanilla_fn() -> None:
        outs["v"] = engine_generate(vanilla, prompts, new, b)

    def mor_fn() -> None:
        outs["m"] = engine_generate(mor, prompts, new, b)

    return {"HF generate (vanilla)": hf_fn, "engine vanilla": vanilla_fn, "engine MoR": mor_fn}


def run(quick: bool = False, batch_sizes: tuple[int, ...] | None = None) -> BenchResult:
    t_start = time.perf_counter()
    batch_sizes = batch_sizes or ((8,) if quick else (8, 16))
    prompt, new, reps = (8, 32), (16 if quick else 32), (1 if quick else 3)
    max_len = prompt[1] + new
    vcfg = make_config(CPU_SHAPE, max_seq_len=max_len, **VANILLA)
    mcfg = make_config(CPU_SHAPE, max_seq_len=max_len, **MOR3)
    vanilla, mor = make_model(vcfg).eval(), make_model(mcfg).eval()
    hf = to_llama(vanilla)
    res = BenchResult(
        7, "hf_decode", "Decode: mor.engine vs Hugging Face generate on the same weights",
        [Column("batch", "B"), Column("variant", "variant"), Column("tok_s", "tokens/s", "{:.0f}"),
         Column("vs_hf", "÷ HF generate", "{:.2f}"),
         Column("vs_engine", "÷ vanilla engine", "{:.2f}"),
         Column("flops_ratio", "decode FLOPs ÷ vanilla", "{:.2f}"),
         Column("same_tokens", "tokens = HF's")],
    )  # fmt: skip
    for b in batch_sizes:
        prompts, _ = make_requests(2 * b, CPU_SHAPE["vocab_size"], prompt, (new, new), seed=b)
        outs: dict[str, Any] = {}
        fns = _variants(hf, vanilla, mor, prompts, new, b, outs)
        times, wall = _timed(fns, reps)
        same = outs["v"][0] == outs["hf"]
        if not same:  # the engine must decode exactly what HF decodes
            raise AssertionError(f"B={b}: engine tokens differ from HF generate's")
        tps = {k: 2 * b * new / min(v) for k, v in times.items()}
        seq = sum(map(len, prompts)) / len(prompts) + new / 2
        active = outs["m"][1].stats.active_fractions(include_prefill=False)
        f_v = forward_flops_per_token(vcfg, seq_len=int(seq)).total
        f_m = forward_flops_per_token(mcfg, seq_len=int(seq), active_fractions=active).total
        flops = {"HF generate (vanilla)": 1.0, "engine vanilla": 1.0, "engine MoR": f_m / f_v}
        for key, t in tps.items():
            res.rows.append({
                "batch": b, "variant": key, "tok_s": t,
                "vs_hf": ratio(t, tps["HF generate (vanilla)"]),
                "vs_engine": ratio(t, tps["engine vanilla"]), "flops_ratio": flops[key],
                "same_tokens": same if key != "engine MoR" else "–",
                "cpu_s": [round(x, 4) for x in times[key]],
                "wall_s": [round(x, 4) for x in wall[key]],
                "tok_s_wall": 2 * b * new / min(wall[key]),
                "active": active if key == "engine MoR" else None,
            })  # fmt: skip
        speed = ratio(tps["engine MoR"], tps["engine vanilla"])
        res.summary[f"engine vanilla ÷ HF generate (B={b})"] = ratio(
            tps["engine vanilla"], tps["HF generate (vanilla)"]
        )
        res.summary[f"MoR ÷ vanilla engine speed (B={b})"] = speed
        res.summary[f"MoR speed-up ÷ FLOP saving (B={b})"] = speed * f_m / f_v
    res.notes += [
        f"Workload: 2·B requests, prompts {prompt[0]}–{prompt[1]} tokens, {new} new tokens each "
        f"(greedy, no eos); tokens/s = generated tokens / CPU time of the process "
        f"(time.process_time, 1 torch thread), prefill included, fastest of {reps} interleaved "
        "runs in one process. This is a shared, oversubscribed 2-core machine: wall time also "
        "counts waiting for a core (wall-clock tokens/s are in the JSON, tok_s_wall); the "
        "ratios are side by side.",
        "HF: transformers LlamaForCausalLM.generate on the converted vanilla weights, static "
        "batches of B (left padding), sdpa attention, DynamicCache; float32.",
        f"Vanilla {vcfg.num_layers} layers; MoR {mcfg.sharing} N_r={mcfg.num_recursions} "
        f"{mcfg.router} (recursion-wise KV), untrained (routing splits tokens by chance). "
        "Decode FLOPs: mor.flops.forward_flops_per_token at the mean sequence length and the "
        "engine's measured decode active fractions.",
    ]
    res.seconds = time.perf_counter() - t_start
    return res


def write(out: Path, results: list[BenchResult], quick: bool) -> dict[str, Any]:
    meta = run_meta(quick)
    import transformers

    meta["transformers"] = transformers.__version__
    doc = {"schema_version": 1, "meta": meta, "benchmarks": [r.to_dict() for r in results]}
    head = (
        f"# mor.engine vs HF generate ({'quick' if quick else 'full'} run, {meta['created']}; "
        f"torch {meta['torch']}, transformers {meta['transformers']}, {meta['torch_threads']} "
        f"thread(s), {meta['cpu_count']} CPUs; a shared machine: timings distorted by other work)"
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "hf_decode.json").write_text(json.dumps(doc, indent=2) + "\n")
    md = "\n".join([head, "", *(r.to_markdown() for r in results)])
    (out / "hf_decode.md").write_text(md)
    return doc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 8 only, fewer tokens, 1 rep")
    ap.add_argument("--out", default="benchmarks/results", help="output folder")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (0 = torch's default)")
    args = ap.parse_args(argv)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print("hf_decode: needs transformers (pip install -e '.[bench]')", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    write(Path(args.out), [run(args.quick)], args.quick)
    print(f"[hf_decode] wrote {args.out}/hf_decode.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
