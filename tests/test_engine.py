"""mor.engine: continuous depth-wise batching gives exactly the tokens of plain step-by-step
decoding, skips deeper recursions for early-exited tokens, and the benchmarks' JSON schema."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mor.engine import DepthwiseBatchingEngine
from mor.generation import generate, naive_generate
from mor.model import MoRModel
from mor.routing import Decision, Memo

ROOT = Path(__file__).resolve().parents[1]
# The same small models and combinations as the model's own tests.
from test_model import (  # noqa: E402
    COMBOS,
    KV_MODES,
    ROUTERS,
    RULE_COMBOS,
    make_model,
    small_config,
)


def workload(vocab: int, n: int = 7, seed: int = 0) -> tuple[list[list[int]], list[int]]:
    """Prompts of 1–12 tokens, max_new_tokens 1–9 (request 0: 8, so that eos can stop it)."""
    g = torch.Generator().manual_seed(seed)
    lens = [int(x) for x in torch.randint(1, 13, (n,), generator=g)]
    prompts = [torch.randint(0, vocab, (t,), generator=g).tolist() for t in lens]
    news = [8] + [int(x) for x in torch.randint(1, 10, (n - 1,), generator=g)]
    return prompts, news


def reference(model: MoRModel, prompts: list, news: list, eos: int | None, **kw) -> list:
    """Plain step-by-step greedy decoding, one request at a time."""
    return [
        generate(model, torch.tensor([p]), max_new_tokens=m, eos_id=eos, **kw)[0].tolist()
        for p, m in zip(prompts, news)
    ]


def run_engine(model: MoRModel, prompts: list, news: list, **kw) -> tuple:
    eng = DepthwiseBatchingEngine(model, **kw)
    ids = [eng.submit(p, m) for p, m in zip(prompts, news)]
    out = eng.run()
    return eng, [out[i] for i in ids], ids


@pytest.mark.parametrize(("sharing", "router", "kv"), COMBOS)
def test_engine_matches_step_by_step_decoding(sharing: str, router: str, kv: str) -> None:
    check_engine_matches_step_by_step(make_model(small_config(sharing, router, kv)))


@pytest.mark.parametrize(("kv", "rule"), RULE_COMBOS)
def test_engine_matches_step_by_step_for_every_inference_rule(kv: str, rule: str) -> None:
    cfg = small_config("middle_cycle", "expert_choice", kv, ec_inference=rule)
    check_engine_matches_step_by_step(make_model(cfg))


def check_engine_matches_step_by_step(model: MoRModel) -> None:
    """Engine tokens, logits, depths and KV bytes equal plain step-by-step decoding's."""
    prompts, news = workload(model.cfg.vocab_size)
    # An eos the model really emits: request 0's third token, so it stops early.
    eos = reference(model, prompts[:1], news[:1], None)[0][2]
    ref = reference(model, prompts, news, eos)
    assert any(len(r) < m for r, m in zip(ref, news)), "eos should stop a request early"

    eng, outs, ids = run_engine(model, prompts, news, max_slots=3, eos_id=eos, record_logits=True)
    assert outs == ref
    st = eng.stats
    assert st.refills > 0  # 7 requests through 3 slots: freed slots were refilled mid-run
    assert st.generated_tokens == sum(map(len, ref))
    assert st.decode_tokens == sum(len(r) - 1 for r in ref)
    for rid, p, r in zip(ids, prompts, ref):
        # Logits and per-token depths equal the model's own full forward over the sequence.
        full = model(torch.tensor([p + r]))
        n = len(p)
        torch.testing.assert_close(
            eng.logits(rid), full.logits[0, n - 1 : n - 1 + len(r)], rtol=0, atol=1e-9
        )
        assert eng.depths(rid) == full.depth[0, n : n + len(r) - 1].tolist()
    # Early exit: the shared block processed exactly Σ depth rows per layer position.
    all_depths = [d for rid in ids for d in eng.depths(rid)]
    assert st.rec_rows == model.cfg.recursion_depth * sum(all_depths)
    assert st.tokens_per_depth == [all_depths.count(d) for d in range(model.cfg.num_recursions + 1)]
    # The naive baseline gives the same tokens and holds the same KV entries.
    naive = naive_generate(model, prompts, news, batch_size=3, eos_id=eos)
    assert naive.outputs == ref
    assert naive.kv_bytes == st.kv_bytes_finished > 0


@pytest.mark.parametrize("kv", KV_MODES)
def test_tokens_at_different_depths_share_layer_calls_and_exits_skip_work(kv: str) -> None:
    cfg = small_config("middle_cycle", "expert_choice", kv, num_recursions=3, num_layers=5)
    model = make_model(cfg, seed=3)
    prompts, news = workload(cfg.vocab_size, n=10, seed=1)
    news = [m + 6 for m in news]
    rows = {u: 0 for u in range(cfg.num_unique_layers)}

    def count(u: int):
        def hook(mod, args, out) -> None:
            if args[0].dim() == 2:  # the engine's [tokens, d] calls (the model's are 3-D)
                rows[u] += args[0].shape[0]

        return hook

    handles = [layer.mlp.register_forward_hook(count(u)) for u, layer in enumerate(model.layers)]
    try:
        eng, outs, ids = run_engine(model, prompts, news, max_slots=4)
    finally:
        for h in handles:
            h.remove()
    assert outs == reference(model, prompts, news, None)
    st = eng.stats
    depths = [d for rid in ids for d in eng.depths(rid)]
    assert len(set(depths)) >= 2 and max(depths) == 3
    # The shared layer ran once per recursion a token actually took: exited tokens skipped
    # the deeper recursions (far fewer rows than every token at every recursion).
    assert rows[1] == sum(depths) == st.rec_rows < 3 * len(depths)
    assert rows[0] == rows[2] == st.decode_tokens == len(depths)
    assert st.tokens_per_recursion == [sum(d > r for d in depths) for r in range(3)]
    # Depth-wise batching: one call of the shared layer per engine step, and many of those
    # calls mixed tokens at different recursions.
    assert st.layer_calls["rec"] <= st.steps
    assert st.mixed_depth_passes > 0
    assert st.mean_depth() == pytest.approx(sum(depths) / len(depths))


def test_max_depth_and_tokens_that_skip_every_recursion() -> None:
    cfg = small_config("cycle", "expert_choice", "recursion_wise", capacities=(0.5, 0.5))
    model = make_model(cfg, seed=5)
    prompts, news = workload(cfg.vocab_size, seed=2)
    eng, outs, ids = run_engine(model, prompts, news, max_slots=2)
    assert outs == reference(model, prompts, news, None)
    assert eng.stats.tokens_per_depth[0] > 0  # capacity < 1 at recursion 1: depth-0 exits
    eng, outs, ids = run_engine(model, prompts, news, max_slots=2, max_depth=1)
    assert outs == reference(model, prompts, news, None, max_depth=1)
    assert max(d for rid in ids for d in eng.depths(rid)) <= 1


def test_submit_validation_and_single_slot() -> None:
    model = make_model(small_config("middle_cycle", "token_choice", "shared"))
    eng = DepthwiseBatchingEngine(model, max_slots=1, max_len=20)
    with pytest.raises(ValueError, match="prompt_ids"):
        eng.submit([], 3)
    with pytest.raises(ValueError, match="max_new_tokens"):
        eng.submit([1, 2], 0)
    with pytest.raises(ValueError, match="max_len"):
        eng.submit([1] * 15, 6)
    with pytest.raises(ValueError, match="max_depth"):
        DepthwiseBatchingEngine(model, max_depth=3)
    prompts, news = workload(model.cfg.vocab_size, n=3)
    _, outs, _ = run_engine(model, prompts, news, max_slots=1)
    assert outs == reference(model, prompts, news, None)


def test_benchmark_smoke_schema(tmp_path: Path) -> None:
    """`python -m benchmarks.run --quick --only 3,4`: the JSON/Markdown schema, no speeds."""
    args = ["--quick", "--only", "3,4", "--out", str(tmp_path)]
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["schema_version"] == 1 and doc["meta"]["quick"] is True
    assert [b["id"] for b in doc["benchmarks"]] == [3, 4]
    for b in doc["benchmarks"]:
        assert set(b) >= {"id", "key", "title", "columns", "headers", "rows", "summary", "notes"}
        assert b["skipped"] is None and b["rows"]
        assert all(set(b["columns"]) <= set(row) for row in b["rows"])
    kv, flops = doc["benchmarks"]
    assert kv["summary"]["max |measured ÷ analytic − 1|"] < 1e-9
    assert {r["kv_cache"] for r in kv["rows"]} == {"recursion_wise", "shared"}
    assert flops["summary"]["max |predicted ÷ measured − 1|"] < 0.02
    assert flops["summary"]["combinations"] == 27
    md = (tmp_path / "results.md").read_text()
    assert "### 3." in md and "### 4." in md and "| --- |" in md


def test_compile_check_smoke(tmp_path: Path) -> None:
    """benchmarks/compile_check's measurement on a micro expert-choice MoR N_r=3: the packed
    training forward is one graph with no break (no host sync, issue #16), and the results
    files carry the benchmarks' schema and the machine they ran on."""
    from benchmarks.common import BenchResult, Column, make_config
    from benchmarks.common import make_model as bench_model
    from benchmarks.compile_check import MICRO_SHAPE, graph_breaks, write

    fields = dict(num_layers=5, sharing="middle_cycle", num_recursions=3, router="expert_choice")
    model = bench_model(make_config(MICRO_SHAPE, **fields)).train()
    found = graph_breaks(model, torch.randint(0, 512, (2, 16)))
    assert found == {"graphs": 1, "breaks": 0, "reasons": []}
    res = BenchResult(1, "graph_breaks", "graph breaks", [Column("graphs", "graphs")], [found])
    doc = write(tmp_path, [res], quick=True)
    assert doc["meta"]["cpu_count"] and doc["meta"]["created"]
    assert json.loads((tmp_path / "compile_check.json").read_text()) == doc
    assert "| graphs |" in (tmp_path / "compile_check.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="would run the real GPU benchmark")
def test_gpu_benchmark_exits_clearly_without_cuda(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "no CUDA device" in proc.stderr and "--smoke" in proc.stderr
    assert not (tmp_path / "results.json").exists()


def with_sign_rule(model: MoRModel) -> MoRModel:
    """The model with its router's inference rule narrowed through ``Router.decide`` alone:
    a token also stops when the first coordinate of its hidden state is negative (a causal,
    per-token rule, like the calibrated thresholds of issue #14 would be)."""
    base = type(model.router)

    class SignRule(base):  # type: ignore[valid-type, misc]
        def decide(
            self, hidden: torch.Tensor, recursion: int, memo: Memo, force_depth: int | None = None
        ) -> Decision:
            self.calls += 1
            dec = super().decide(hidden, recursion, memo, force_depth)
            return dataclasses.replace(dec, keep=dec.keep & (hidden[..., 0] >= 0))

    router = SignRule(model.cfg).double()
    router.load_state_dict(model.router.state_dict())
    router.calls = 0
    model.router = router
    return model


@pytest.mark.parametrize("router", ROUTERS)
def test_model_and_engine_route_through_the_same_decide(router: str) -> None:
    """Overriding ``decide`` changes the model's forward and the engine identically."""
    cfg = small_config("middle_cycle", router, "recursion_wise", num_recursions=3, num_layers=5)
    base, model = make_model(cfg, seed=3), with_sign_rule(make_model(cfg, seed=3))
    prompts, news = workload(cfg.vocab_size, seed=4)
    x = torch.tensor([prompts[0] + prompts[1]])
    with torch.no_grad():
        assert not torch.equal(base(x).depth, model(x).depth)  # the model took the new rule
    ref = reference(model, prompts, news, None)
    calls = model.router.calls
    eng, outs, ids = run_engine(model, prompts, news, max_slots=3, record_logits=True)
    assert model.router.calls > calls  # the engine asked the same method
    assert outs == ref
    for rid, p, r in zip(ids, prompts, ref):
        with torch.no_grad():
            full = model(torch.tensor([p + r]))
        n = len(p)
        assert eng.depths(rid) == full.depth[0, n : n + len(r) - 1].tolist()
        torch.testing.assert_close(
            eng.logits(rid), full.logits[0, n - 1 : n - 1 + len(r)], rtol=0, atol=1e-9
        )
    base_eng, _, base_ids = run_engine(base, prompts, news, max_slots=3)
    new_depths = [d for rid in ids for d in eng.depths(rid)]
    assert new_depths != [d for rid in base_ids for d in base_eng.depths(rid)]
    assert 0 in new_depths  # the rule made tokens exit before recursion 1
