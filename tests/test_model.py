"""The MoR model: configs, sharing, routing, causality, incremental decoding, test-time depth."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mor.checkpoint import load_pretrained, save_pretrained
from mor.config import MoRConfig, build_config
from mor.generation import generate
from mor.model import KVCache, MoRModel
from mor.overrides import MAX_CONFIG_BYTES, ConfigError, load_yaml

SHARINGS = ["cycle", "sequence", "middle_cycle", "middle_sequence"]
ROUTERS = ["none", "expert_choice", "token_choice"]
KV_MODES = ["recursion_wise", "shared"]
COMBOS = [("none", "none", "recursion_wise"), *itertools.product(SHARINGS, ROUTERS, KV_MODES)]
# Expert-choice's other inference rules (COMBOS run the default, 'calibrated').
RULE_COMBOS = list(itertools.product(KV_MODES, ["threshold", "aux_router"]))


def small_config(sharing: str, router: str, kv: str, **kw) -> MoRConfig:
    n_r = 1 if sharing == "none" else 2
    fields = dict(sharing=sharing, num_recursions=n_r, router=router, kv_cache=kv, num_layers=6)
    fields.update(kw)
    return build_config("micro", **fields)


def make_model(cfg: MoRConfig, seed: int = 0) -> MoRModel:
    torch.manual_seed(seed)
    model = MoRModel(cfg).double()
    # Larger router weights than the default init so that inference routing really splits
    # tokens across depths (a near-zero router would send everyone everywhere).
    if model.router is not None:
        for p in model.router.parameters():
            if p.requires_grad:
                torch.nn.init.normal_(p, std=0.5)
        if hasattr(model.router, "threshold"):  # a calibrated threshold away from 0
            n_r = model.cfg.num_recursions
            model.router.threshold.copy_(0.01 * (-1.0) ** torch.arange(n_r, dtype=torch.float64))
    return model.eval()


# ---------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("fields", "field_name"),
    [
        (dict(sharing="none", num_recursions=2), "num_recursions"),
        (dict(router="expert_choice"), "router"),
        (dict(sharing="cycle", num_recursions=4), "num_layers"),
        (dict(sharing="middle_cycle", num_recursions=3), "num_layers"),
        (dict(sharing="cycle", num_recursions=1), "num_recursions"),
        (dict(sharing="cycle", num_recursions=2, router="expert_choice", gate="softmax"), "gate"),
        (
            dict(sharing="cycle", num_recursions=2, router="expert_choice", capacities=[1.0]),
            "capacities",
        ),
        (
            dict(sharing="cycle", num_recursions=2, router="expert_choice", capacities=[0.5, 1.0]),
            "capacities",
        ),
        (
            dict(sharing="cycle", num_recursions=2, router="token_choice", capacities=[1.0, 0.5]),
            "capacities",
        ),
        (dict(kv_cache="shared"), "kv_cache"),
        (dict(num_kv_heads=3), "num_kv_heads"),
        (dict(router="bogus"), "router"),
        (dict(sharing="diagonal"), "sharing"),
        (dict(num_layer=3), "num_layer"),
        (dict(hidden_size=-4), "hidden_size"),
    ],
)
def test_invalid_configs_name_the_field(fields: dict, field_name: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config("micro", **{"num_layers": 6, **fields})
    assert field_name in str(err.value)


def test_literal_errors_list_allowed_values() -> None:
    with pytest.raises(ConfigError) as err:
        build_config("micro", router="bogus")
    assert "expert_choice" in str(err.value) and "token_choice" in str(err.value)


def test_overrides_and_unknown_preset() -> None:
    cfg = build_config(
        "tiny", overrides=["sharing=middle_cycle", "num_recursions=2", "gate_scale=0.5"]
    )
    assert (cfg.sharing, cfg.num_recursions, cfg.gate_scale) == ("middle_cycle", 2, 0.5)
    with pytest.raises(ConfigError, match="preset"):
        build_config("no-such-preset")


def _alias_bomb(levels: int) -> str:
    """A "billion laughs" YAML: each anchor lists the previous one 9 times (9**levels nodes)."""
    lines = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_yaml_alias_bombs_and_huge_files_are_refused(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb(9))  # ~600 bytes that expand to 9**9 ≈ 387M nodes
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"bomb\.yaml.*alias"):
        build_config("micro", path=bomb)
    assert time.monotonic() - start < 2.0
    flow = "[&a0 [" + ", ".join(["lol"] * 9) + "]"
    flow += "".join(f", &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10))
    with pytest.raises(ConfigError, match=r"gate_scale.*alias"):
        build_config("micro", overrides=[f"gate_scale={flow}]"])
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(ConfigError, match=r"big\.yaml.*1 MiB"):
        load_yaml(big)
    deep = tmp_path / "deep.yaml"
    deep.write_text("x: " + "[" * 1000 + "]" * 1000)
    with pytest.raises(ConfigError, match=r"deep\.yaml.*nested"):
        load_yaml(deep)
    small = tmp_path / "small.yaml"
    small.write_text(_alias_bomb(3))  # aliases within the limit still work
    assert len(load_yaml(small)["a3"]) == 9


def test_every_field_has_a_docstring() -> None:
    for name, f in MoRConfig.model_fields.items():
        assert f.description and len(f.description) > 10, name


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({}, 315e6),
        (dict(sharing="middle_cycle", num_recursions=2), 167e6),
        (dict(sharing="middle_cycle", num_recursions=3), 118e6),
    ],
)
def test_paper_parameter_counts(overrides: dict, expected: float) -> None:
    cfg = build_config("smollm-360m", **overrides)
    with torch.device("meta"):
        model = MoRModel(cfg)
    assert abs(model.num_parameters()["non_embedding"] / expected - 1) < 0.01


def test_layer_maps() -> None:
    def lm(sharing: str, n_r: int, n_l: int) -> list[int]:
        return build_config("micro", sharing=sharing, num_recursions=n_r, num_layers=n_l).layer_map

    assert lm("cycle", 2, 6) == [0, 1, 2, 0, 1, 2]
    assert lm("sequence", 2, 6) == [0, 0, 1, 1, 2, 2]
    assert lm("middle_cycle", 2, 6) == [0, 1, 2, 1, 2, 3]
    assert lm("middle_sequence", 2, 6) == [0, 1, 1, 2, 2, 3]
    assert lm("middle_cycle", 3, 8) == [0, 1, 2, 1, 2, 1, 2, 3]
    cfg = build_config("micro", sharing="cycle", num_recursions=3, num_layers=6)
    assert [cfg.recursion_layers(r) for r in range(3)] == [[0, 1], [0, 1], [0, 1]]


def test_shared_weights_exist_once() -> None:
    cfg = small_config("middle_cycle", "none", "recursion_wise")
    model = MoRModel(cfg)
    assert len(model.layers) == cfg.num_unique_layers == 4
    vanilla = MoRModel(build_config("micro", num_layers=6))
    per_layer = sum(p.numel() for p in vanilla.layers[0].parameters())
    diff = vanilla.num_parameters()["total"] - model.num_parameters()["total"]
    assert diff == 2 * per_layer


# ---------------------------------------------------------------------------------- inference
@pytest.mark.parametrize(("sharing", "router", "kv"), COMBOS)
def test_inference_is_causal(sharing: str, router: str, kv: str) -> None:
    model = make_model(small_config(sharing, router, kv))
    torch.manual_seed(1)
    x = torch.randint(0, model.cfg.vocab_size, (2, 24))
    t = 11
    y = x.clone()
    y[:, t + 1 :] = torch.randint(0, model.cfg.vocab_size, (2, 24 - t - 1))
    with torch.no_grad():
        a, b = model(x).logits, model(y).logits
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1], rtol=0, atol=1e-10)
    assert not torch.allclose(a[:, t + 1 :], b[:, t + 1 :])


@pytest.mark.parametrize(("sharing", "router", "kv"), COMBOS)
def test_padding_takes_no_capacity(sharing: str, router: str, kv: str) -> None:
    """Left- and right-padded rows give the same logits on real tokens as unpadded ones."""
    model = make_model(small_config(sharing, router, kv))
    x = torch.randint(0, model.cfg.vocab_size, (1, 12))
    pad = torch.zeros(1, 5, dtype=torch.long)
    with torch.no_grad():
        ref = model(x).logits
        ones = torch.ones_like(x)
        left = model(torch.cat([pad, x], 1), attention_mask=torch.cat([pad, ones], 1))
        right = model(torch.cat([x, pad], 1), attention_mask=torch.cat([ones, pad], 1))
    torch.testing.assert_close(left.logits[:, 5:], ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(right.logits[:, :12], ref, rtol=0, atol=1e-10)


@pytest.mark.parametrize(("sharing", "router", "kv"), COMBOS)
@pytest.mark.parametrize("depth", [{}, {"max_depth": 1}, {"force_depth": 2}])
def test_incremental_decoding_matches_full_forward(
    sharing: str, router: str, kv: str, depth: dict
) -> None:
    model = make_model(small_config(sharing, router, kv))
    torch.manual_seed(2)
    x = torch.randint(0, model.cfg.vocab_size, (3, 20))
    max_depth = depth.get("max_depth")
    if "force_depth" in depth and sharing == "none":
        depth = {"force_depth": 1}
    with torch.no_grad():
        full = model(x, **depth)
        cache = KVCache()
        steps = [model(x[:, :7], cache=cache, **depth).logits]
        for t in range(7, 20):
            steps.append(model(x[:, t : t + 1], cache=cache, **depth).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, rtol=0, atol=1e-9)
    if "force_depth" in depth:
        assert torch.all(full.depth == depth["force_depth"])
    elif router != "none" and max_depth is None:
        # The inference router really splits tokens across depths in this test.
        assert len(set(full.depth.flatten().tolist())) > 1


@pytest.mark.parametrize(("kv", "rule"), RULE_COMBOS)
def test_every_inference_rule_is_causal_and_decodes_like_the_full_forward(
    kv: str, rule: str
) -> None:
    cfg = small_config(
        "middle_cycle", "expert_choice", kv, num_recursions=3, num_layers=5, ec_inference=rule
    )
    model = make_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, cfg.vocab_size, (3, 8))
    with torch.no_grad():
        full, other = model(x), model(y)
        cache = KVCache()
        steps = [model(x[:, :7], cache=cache).logits]
        steps += [model(x[:, t : t + 1], cache=cache).logits for t in range(7, 20)]
    torch.testing.assert_close(full.logits[:, :12], other.logits[:, :12], rtol=0, atol=1e-10)
    torch.testing.assert_close(torch.cat(steps, 1), full.logits, rtol=0, atol=1e-9)
    assert len(set(full.depth.flatten().tolist())) > 1


def test_generate_with_left_padded_prompts() -> None:
    model = make_model(small_config("middle_cycle", "expert_choice", "recursion_wise"))
    x = torch.randint(1, model.cfg.vocab_size, (1, 9))
    solo = generate(model, x, max_new_tokens=6)
    padded = torch.cat([torch.zeros(1, 4, dtype=torch.long), x], 1)
    batch = torch.cat([padded, torch.randint(1, model.cfg.vocab_size, (1, 13))], 0)
    mask = torch.cat([torch.cat([torch.zeros(1, 4), torch.ones(1, 9)], 1), torch.ones(1, 13)], 0)
    both = generate(model, batch, attention_mask=mask.long(), max_new_tokens=6)
    assert torch.equal(both[0], solo[0])


@pytest.mark.parametrize("router", ROUTERS)
def test_test_time_depth(router: str) -> None:
    model = make_model(small_config("middle_cycle", router, "recursion_wise"))
    x = torch.randint(0, model.cfg.vocab_size, (2, 16))
    with torch.no_grad():
        d1, d2 = model(x, max_depth=1), model(x, max_depth=2)
    assert int(d1.depth.max()) <= 1
    if router == "none":
        assert torch.all(d1.depth == 1) and torch.all(d2.depth == 2)
        assert d1.stats.tokens_per_depth == [0, 32, 0]
    assert not torch.allclose(d1.logits, d2.logits)
    with pytest.raises(ValueError, match="max_depth"):
        model(x, max_depth=3)


# ---------------------------------------------------------------------------------- training
def test_expert_choice_training_keeps_capacity() -> None:
    cfg = small_config(
        "middle_cycle",
        "expert_choice",
        "recursion_wise",
        num_recursions=3,
        num_layers=5,
        z_loss_coef=0.01,
    )
    model = MoRModel(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 30))
    out = model(x, labels=x)
    # Capacities (N_r − r)/N_r: 30, 20 and 10 of 30 tokens (paper §2.2.1).
    assert out.stats.active_fraction == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert out.stats.tokens_per_depth == [0, 20, 20, 20]
    assert {"aux", "z"} <= set(out.stats.losses)
    out.loss.backward()
    for net in model.router.nets:
        assert net.weight.grad is not None and net.weight.grad.abs().sum() > 0


def test_expert_choice_padding_in_training() -> None:
    cfg = small_config("cycle", "expert_choice", "recursion_wise")
    model = MoRModel(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, 10:] = 0
    out = model(x, attention_mask=mask, labels=x)
    # Row 0 keeps 10 of 20 at recursion 2, row 1 keeps 5 of its 10 real tokens.
    assert (out.depth[1, 10:] == 0).all()
    assert int((out.depth[0] == 2).sum()) == 10 and int((out.depth[1] == 2).sum()) == 5


def test_token_choice_losses_and_loss_free_bias() -> None:
    cfg = small_config("middle_cycle", "token_choice", "recursion_wise")
    model = MoRModel(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    out = model(x, labels=x)
    assert "balance" in out.stats.losses and out.router_loss > 0
    out.loss.backward()
    assert model.router.net.weight.grad.abs().sum() > 0

    cfg_lf = small_config(
        "middle_cycle",
        "token_choice",
        "recursion_wise",
        balancing="loss_free",
        bias_update_rate=0.01,
    )
    model = MoRModel(cfg_lf).train()
    with torch.no_grad():
        model.router.net.weight.zero_()
        model.router.net.weight[0].fill_(1.0)  # everyone prefers depth 1 at first
    before = model.router.bias.clone()
    out = model(x, labels=x)
    assert "balance" not in out.stats.losses
    model.update_router_bias()
    delta = model.router.bias - before
    # Depth 1 was over-loaded → its bias goes down; depth 2 under-loaded → up.
    assert delta[0] < 0 < delta[1]
    assert not model.router.bias.requires_grad
    assert "router.bias" in model.state_dict()


@pytest.mark.parametrize("logit", [50.0, -50.0])
def test_gated_update_is_h_plus_g_times_residual_branch(logit: float) -> None:
    """H + g·f(H) with f = Block(H) − H: g = 1 is the plain recursive model, g = 0 a skip."""
    plain = make_model(small_config("cycle", "none", "recursion_wise"))
    # tanh(50) == 1.0 exactly; sigmoid(-50) ≈ 2e-22: an exact skip in practice.
    gate = "tanh" if logit > 0 else "sigmoid"
    cfg = small_config("cycle", "expert_choice", "recursion_wise", capacities=[1.0, 1.0], gate=gate)
    mor = MoRModel(cfg).double().eval()
    mor.load_state_dict(plain.state_dict(), strict=False)
    for net in mor.router.nets:  # force every router logit
        net.register_forward_hook(lambda m, i, o: torch.full_like(o, logit))
    x = torch.randint(0, cfg.vocab_size, (2, 10))
    with torch.no_grad():
        out = mor(x).logits
        if logit > 0:
            ref = plain(x).logits
        else:
            ref = torch.nn.functional.linear(plain.norm(plain.embed(x)), plain.embed.weight)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-9)


def test_training_reduces_loss() -> None:
    torch.manual_seed(0)
    cfg = small_config("middle_cycle", "expert_choice", "recursion_wise")
    model = MoRModel(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = torch.randint(0, cfg.vocab_size, (4, 32))
    losses = []
    for _ in range(30):
        out = model(x, labels=x)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---------------------------------------------------------------------------------- calibration
def _byte_documents() -> tuple[torch.Tensor, torch.Tensor]:
    """English text as byte tokens (pydoc's help topics), split by a hash of each document so
    the held-out text is text the router never trained on, from the same distribution."""
    import hashlib
    from pydoc_data.topics import topics

    parts: dict[bool, list[int]] = {True: [], False: []}
    for key in sorted(topics):
        held = hashlib.sha1(key.encode()).digest()[0] % 8 == 0
        parts[held].extend(topics[key].encode())
    return torch.tensor(parts[False]), torch.tensor(parts[True])


def _windows(data: torch.Tensor, n: int, t: int, g: torch.Generator) -> torch.Tensor:
    start = torch.randint(0, len(data) - t, (n,), generator=g)
    return torch.stack([data[s : s + t] for s in start.tolist()])


def test_calibrated_router_runs_the_depth_it_trained_for() -> None:
    """A small expert-choice model trained on English bytes runs, on held-out text and in eval
    mode, each recursion at its training capacity (±0.05) and agrees with top-k on most tokens.

    Tolerances: 4,096 held-out tokens give the active fraction a sampling error of ~0.01, and
    the threshold averages the last ~10 batches' cut-offs of a router still learning, so 0.05
    is the issue's bound with room; a global threshold cannot reproduce each row's own top-k
    exactly (rows differ in how many tokens clear it), so agreement ≥ 0.85 for this 30-second
    byte-level model (the quickstart's models reach ≥ 0.9, README)."""
    import math

    from mor.analysis import routing_drift

    train, held = _byte_documents()
    cfg = build_config(
        "micro", vocab_size=256, sharing="middle_cycle", num_recursions=3, num_layers=5,
        router="expert_choice",
    )  # fmt: skip
    assert cfg.ec_inference == "calibrated"
    torch.manual_seed(0)
    model, g = MoRModel(cfg).train(), torch.Generator().manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    steps = 200
    for step in range(steps):
        for group in opt.param_groups:  # cosine decay, as the trainer does
            group["lr"] = 3e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
        x = _windows(train, 16, 64, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert int(model.router.calibration_batches[1]) == steps
    drift = routing_drift(model, _windows(held, 64, 64, torch.Generator().manual_seed(1)))
    assert drift.capacity == pytest.approx([1.0, 2 / 3, 1 / 3])
    assert drift.active == pytest.approx(drift.capacity, abs=0.05), drift
    assert drift.topk_active == pytest.approx(drift.capacity, abs=1 / 64)  # k = ⌈c·T⌉
    assert min(drift.agreement) >= 0.85, drift
    assert model.training  # routing_drift leaves the model as it found it


def test_inference_rule_does_not_change_the_main_models_init_or_training() -> None:
    """Every rule trains the same main model (top-k), so a sweep over ec_inference compares
    only the inference rule: same initial weights, same gradients on every shared parameter
    (the aux router's input is detached), and the aux router learns from its own loss."""
    grads = {}
    x = torch.randint(0, 512, (2, 16))
    for rule in ("calibrated", "aux_router"):
        torch.manual_seed(0)
        cfg = small_config("cycle", "expert_choice", "recursion_wise", ec_inference=rule)
        model = MoRModel(cfg).double().train()
        out = model(x, labels=x)
        assert ("aux_router" in out.stats.losses) == (rule == "aux_router")
        out.loss.backward()
        grads[rule] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    aux = {n for n in grads["aux_router"] if n.startswith("router.aux_nets.")}
    assert aux and all(grads["aux_router"][n].abs().sum() > 0 for n in aux)
    assert grads["calibrated"].keys() == grads["aux_router"].keys() - aux
    for name, g in grads["calibrated"].items():
        torch.testing.assert_close(grads["aux_router"][name], g, rtol=0, atol=0)


# ---------------------------------------------------------------------------------- exports
_PEAK_RSS = """
import resource, sys, time
from mor.checkpoint import load_pretrained
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.monotonic()
try:
    load_pretrained(sys.argv[1])
    print("LOADED")
except ValueError as exc:
    print("ERROR", exc)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("GROWTH_MB", (peak - base) / 1024, "SECONDS", time.monotonic() - start)
"""


def test_export_config_is_checked_against_the_weights_before_allocating(tmp_path: Path) -> None:
    cfg = small_config("cycle", "expert_choice", "recursion_wise")
    export = save_pretrained(tmp_path / "export", cfg, MoRModel(cfg).state_dict())
    model, _ = load_pretrained(export)  # an honest export loads
    assert model.cfg == cfg and not model.training
    payload = json.loads((export / "config.json").read_text())
    payload["model"]["hidden_size"] = 4096  # ~200M parameters if it were allocated
    (export / "config.json").write_text(json.dumps(payload))
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(export)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.splitlines()
    assert line[0].startswith("ERROR") and "model.pt" in line[0] and "shape" in line[0], line
    growth, seconds = float(line[1].split()[1]), float(line[1].split()[3])
    assert growth < 200 and seconds < 5, line
    # A missing tensor is named too.
    state = MoRModel(cfg).state_dict()
    state.pop("norm.weight")
    torch.save(state, export / "model.pt")
    payload["model"]["hidden_size"] = cfg.hidden_size
    (export / "config.json").write_text(json.dumps(payload))
    with pytest.raises(ValueError, match=r"missing.*norm\.weight"):
        load_pretrained(export)
    (export / "config.json").write_text(" " * (MAX_CONFIG_BYTES + 1))
    with pytest.raises(ValueError, match=r"config\.json.*1 MiB"):
        load_pretrained(export)
