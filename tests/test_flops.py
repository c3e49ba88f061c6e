"""mor.flops: paper budget anchors, agreement with FlopCounterMode on the real module, and
monotonicity / KV-cache properties."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mor.config import build_config
from mor.flops import (
    FlopsBreakdown,
    active_fractions_from_stats,
    flop_counter_mapping,
    forward_flops_per_token,
    inference_flops_by_depth,
    kv_cache_bytes_per_token,
    steps_for_budget,
    training_flops_per_token,
)
from mor.model import MoRModel

# ----------------------------------------------------------------------------- 1. paper anchors
BUDGET = 16.5e18
TOKENS_PER_STEP = 1024 * 2048


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 9438.2),
        (dict(sharing="middle_cycle", num_recursions=3, router="expert_choice"), 14159.9),
    ],
)
def test_paper_budget_anchors(overrides: dict[str, Any], expected: float) -> None:
    cfg = build_config("smollm-360m", **overrides)
    steps = steps_for_budget(cfg, BUDGET, TOKENS_PER_STEP, seq_len=2048, convention="paper")
    assert abs(steps - expected) / expected < 1e-3
    exact = BUDGET / (TOKENS_PER_STEP * training_flops_per_token(cfg, 2048, convention="paper"))
    assert abs(exact - expected) / expected < 1e-3
    assert steps == int(exact)


def test_paper_convention_ignores_router_head_and_gqa() -> None:
    cfg = build_config("smollm-360m")
    fb = forward_flops_per_token(cfg, convention="paper")
    d, f, n, layers = cfg.hidden_size, cfg.ffn_size, 2048, cfg.num_layers
    assert fb.router == fb.lm_head == fb.embedding == 0
    assert fb.layers == pytest.approx(layers * 2 * (4 * d * d + 3 * d * f))
    assert fb.attention == pytest.approx(layers * 2 * n * d)
    assert training_flops_per_token(cfg, convention="paper") == pytest.approx(fb.total)
    assert training_flops_per_token(cfg) == pytest.approx(3 * forward_flops_per_token(cfg).total)


# ----------------------------------------------------------------------------- 2. FlopCounterMode
_MAPPING = flop_counter_mapping()


def _combos() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = [dict(sharing="none")]
    for sharing, router, kv in itertools.product(
        ["cycle", "sequence", "middle_cycle", "middle_sequence"],
        ["none", "expert_choice", "token_choice"],
        ["recursion_wise", "shared"],
    ):
        n_r = 2 if sharing.startswith("middle") else 3
        out.append(dict(sharing=sharing, router=router, kv_cache=kv, num_recursions=n_r))
    for router, kv in [("expert_choice", "shared"), ("token_choice", "recursion_wise")]:
        out.append(
            dict(sharing="middle_cycle", num_recursions=2, router=router, kv_cache=kv,
                 router_network="mlp")
        )  # fmt: skip
    # The inference rules: the auxiliary router adds FLOPs, the plain threshold does not.
    for rule in ("aux_router", "threshold"):
        out.append(
            dict(sharing="cycle", num_recursions=3, router="expert_choice",
                 ec_inference=rule)
        )  # fmt: skip
    return out


def _ids(ov: dict[str, Any]) -> str:
    return "-".join(str(v) for k, v in ov.items() if k != "num_recursions")


def _measure(model: MoRModel, ids: torch.Tensor, max_depth: int | None) -> tuple[int, Any]:
    with torch.no_grad(), FlopCounterMode(display=False, custom_mapping=_MAPPING) as counter:
        out = model(ids, max_depth=max_depth)
    return counter.get_total_flops(), out


@pytest.mark.parametrize("overrides", _combos(), ids=_ids)
def test_exact_count_matches_flop_counter(overrides: dict[str, Any]) -> None:
    cfg = build_config("micro", num_layers=6, **overrides)
    torch.manual_seed(0)
    model = MoRModel(cfg)
    n = cfg.max_seq_len
    ids = torch.randint(0, cfg.vocab_size, (1, n))
    for mode, max_depth in itertools.product(("train", "eval"), (None, 1)):
        model.train(mode == "train")
        measured, out = _measure(model, ids, max_depth)
        fractions = active_fractions_from_stats(out.stats) if out.stats is not None else None
        if fractions is not None:
            assert len(fractions) == cfg.num_recursions
        fb = forward_flops_per_token(
            cfg, active_fractions=fractions, max_depth=max_depth, attention="dense"
        )
        predicted = fb.total * n
        assert measured > 0
        rel = abs(predicted - measured) / measured
        assert rel < 0.02, f"{mode} max_depth={max_depth}: {predicted} vs {measured} ({rel:.2%})"


def test_math_backend_agrees() -> None:
    """Without the custom SDPA mapping: the math kernel's bmm calls are counted natively."""
    cfg = build_config(
        "micro", num_layers=6, sharing="middle_cycle", num_recursions=2,
        router="expert_choice", kv_cache="shared",
    )  # fmt: skip
    model = MoRModel(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as c:
        out = model(ids)
    fr = active_fractions_from_stats(out.stats)
    predicted = forward_flops_per_token(cfg, active_fractions=fr, attention="dense").total
    assert predicted * cfg.max_seq_len == pytest.approx(c.get_total_flops(), rel=0.02)


# ----------------------------------------------------------------------------- 3. properties
def _mor(n_r: int = 3, **kw: Any) -> Any:
    return build_config("smollm-360m", sharing="middle_cycle", num_recursions=n_r, **kw)


@pytest.mark.parametrize("convention", ["exact", "paper"])
@pytest.mark.parametrize("kv", ["recursion_wise", "shared"])
def test_inference_flops_increase_with_depth(convention: str, kv: str) -> None:
    cfg = _mor(router="expert_choice", kv_cache=kv)
    by_depth = inference_flops_by_depth(cfg, convention=convention)
    assert sorted(by_depth) == [1, 2, 3]
    totals = [by_depth[d].total for d in (1, 2, 3)]
    assert all(a < b for a, b in itertools.pairwise(totals))
    assert by_depth[1].per_recursion[1:] == [0.0, 0.0]
    # Full depth with every token active = the plain recursive transformer's forward.
    full = forward_flops_per_token(cfg, active_fractions=[1, 1, 1], convention=convention)
    assert by_depth[3].total == pytest.approx(full.total)


def test_vanilla_trains_more_flops_than_mor_at_equal_depth() -> None:
    vanilla = build_config("smollm-360m")
    for router in ("expert_choice", "token_choice"):
        mor = _mor(router=router)
        assert mor.num_layers == vanilla.num_layers
        for conv in ("exact", "paper"):
            assert training_flops_per_token(vanilla, convention=conv) > training_flops_per_token(
                mor, convention=conv
            )


def test_kv_cache_bytes() -> None:
    vanilla = build_config("smollm-360m")
    per_site = 2 * vanilla.num_kv_heads * vanilla.head_dim * 2
    assert kv_cache_bytes_per_token(vanilla) == vanilla.num_layers * per_site
    with pytest.raises(ValueError, match="kv_cache"):
        kv_cache_bytes_per_token(vanilla, kv_cache="shared")
    for n_r in (2, 3):
        cfg = _mor(n_r, router="expert_choice")
        rw = kv_cache_bytes_per_token(cfg, "recursion_wise")
        shared = kv_cache_bytes_per_token(cfg, "shared")
        assert shared < rw < kv_cache_bytes_per_token(vanilla)
        # Shared KV: first/last layer + one recursion's block, all tokens.
        assert shared == (2 + cfg.recursion_depth) * per_site
        caps = cfg.capacity_schedule
        assert rw == pytest.approx((2 + cfg.recursion_depth * sum(caps)) * per_site)
    cfg = _mor(2, router="expert_choice")
    assert kv_cache_bytes_per_token(cfg, bytes_per_element=4) == 2 * kv_cache_bytes_per_token(cfg)


# ----------------------------------------------------------------------------- API details
def test_breakdown_dict_and_validation() -> None:
    cfg = _mor(3, router="token_choice")
    fb = forward_flops_per_token(cfg, seq_len=512)
    assert isinstance(fb, FlopsBreakdown)
    d = fb.to_dict()
    assert set(d) >= {"layers", "attention", "router", "lm_head", "embedding", "per_recursion"}
    assert d["total"] == pytest.approx(fb.total)
    assert len(fb.per_recursion) == 3 and fb.router == 2 * cfg.hidden_size * 3
    assert fb.lm_head == 2 * cfg.hidden_size * cfg.vocab_size and fb.embedding == 0
    with pytest.raises(ValueError, match="active_fractions"):
        forward_flops_per_token(cfg, active_fractions=[1.0, 0.5])
    with pytest.raises(ValueError, match="active_fractions"):
        forward_flops_per_token(cfg, active_fractions=[1.0, 1.5, 0.2])
    with pytest.raises(ValueError, match="max_depth"):
        forward_flops_per_token(cfg, max_depth=4)
    with pytest.raises(ValueError, match="max_depth"):
        forward_flops_per_token(cfg, max_depth=0)
    with pytest.raises(ValueError, match="seq_len"):
        forward_flops_per_token(cfg, seq_len=0)
    with pytest.raises(ValueError, match="convention"):
        forward_flops_per_token(cfg, convention="chinchilla")  # type: ignore[arg-type]
    for bad in (0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="budget_flops"):
            steps_for_budget(cfg, bad, 1024)
    with pytest.raises(ValueError, match="tokens_per_step"):
        steps_for_budget(cfg, 1e18, -1)
    with pytest.raises(ValueError, match="stats"):
        active_fractions_from_stats(None)


def test_causal_is_about_half_of_dense_and_shared_kv_is_cheaper() -> None:
    cfg = _mor(3, router="expert_choice")
    causal = forward_flops_per_token(cfg).attention
    dense = forward_flops_per_token(cfg, attention="dense").attention
    assert 0.45 < causal / dense < 0.55
    shared = cfg.model_copy(update={"kv_cache": "shared"})
    a, b = forward_flops_per_token(cfg), forward_flops_per_token(shared)
    assert b.layers < a.layers  # no K/V projections at recursions r > 0
    assert b.per_recursion[0] == pytest.approx(a.per_recursion[0])
