"""The training hot path's options (issue #16) against the eager fp32 trainer: activation
checkpointing, torch.compile, bf16 with ZeRO-3, the fused AdamW. Tiny models through the
trainer's own components (``trainers.components``: ``build_engine``, ``optimizer_step``) in
this process, a world-1 gloo group standing in for Ray Train's: seconds, no Ray."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from core.storage import Location
from mor.config import build_config
from mor.model import MoRModel
from trainers.components import (
    BatchSampler,
    build_engine,
    checkpoint_layers,
    optimizer_name,
    optimizer_step,
)
from trainers.config import FaultInjection, TrainConfig
from trainers.faults import FaultInjector
from trainers.step_metrics import ReducedStep

VOCAB = 97
MOR_EC3 = dict(sharing="middle_cycle", num_recursions=3, num_layers=5, router="expert_choice")
"""Middle-cycle MoR, expert-choice, N_r = 3: a unique first and last layer around one shared
layer applied three times."""


class _Batches:
    """A fixed set of token windows with the sampler's interface (``TokenWindows.shuffled``)."""

    def __init__(self, vocab: int, n: int, seq: int) -> None:
        self.rows = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.rows)

    def shuffled(self, seed: int, epoch: int, i: int) -> torch.Tensor:
        return self.rows[i]


@pytest.fixture(scope="module")
def world_of_one(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The process group DeepSpeed needs, as Ray Train sets it up on a worker (world 1); one
    per module: DeepSpeed caches its groups, so a second group in one process would break it.
    Yields a scratch folder."""
    import torch.distributed as dist

    tmp = tmp_path_factory.mktemp("world")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in {"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1"}.items():
            mp.setenv(key, value)
        dist.init_process_group("gloo", init_method=f"file://{tmp / 'pg'}", rank=0, world_size=1)
        try:
            yield tmp
        finally:
            dist.destroy_process_group()


def _train(tmp_path: Path, mor_cfg: Any, fields: dict[str, Any]) -> tuple[Any, list[ReducedStep]]:
    """3 optimizer steps of 2 micro-batches (2 × 16 tokens), as the training loop runs them."""
    cfg = TrainConfig.model_validate(
        {"batch": {"micro_batch_size": 2, "grad_accum_steps": 2}, "optim": {"lr": 1e-2}, **fields}
    )
    cpu = torch.device("cpu")
    engine = build_engine(cfg, mor_cfg, 3, cpu)
    sampler = BatchSampler(_Batches(VOCAB, 12, 16), 2, seed=0)
    faults = FaultInjector(FaultInjection(), Location.parse(tmp_path), rank=0)
    steps = [
        optimizer_step(engine, sampler, s, 2, cpu, faults).reduce(cpu, True) for s in (1, 2, 3)
    ]
    return engine, steps


def _counter(counts: list[int], i: int) -> Any:
    def hook(*_: Any) -> None:
        counts[i] += 1

    return hook


@pytest.mark.parametrize("shape", [dict(sharing="none"), MOR_EC3], ids=["vanilla", "mor-ec-mc3"])
def test_activation_checkpointing_same_loss_and_grads(shape: dict[str, Any]) -> None:
    """Checkpointed layers give the loss and every gradient of the plain model, recompute each
    layer application once in the backward (the shared layer at each of its 3 recursions) and
    leave parameter names, hence checkpoints and exports, as they were."""
    torch.manual_seed(0)
    plain = MoRModel(build_config("micro", vocab_size=VOCAB, **shape))
    ckpt = copy.deepcopy(plain)
    assert checkpoint_layers(ckpt) == len(ckpt.layers)
    assert checkpoint_layers(ckpt) == 0  # idempotent
    calls = {"plain": [0] * len(plain.layers), "ckpt": [0] * len(ckpt.layers)}
    for key, model in (("plain", plain), ("ckpt", ckpt)):
        for i, layer in enumerate(model.layers):
            layer.attn.register_forward_hook(_counter(calls[key], i))
    x = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
    losses = []
    for model in (plain, ckpt):
        loss = model(x, labels=x).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    names = [n for n, _ in plain.named_parameters()]
    assert names == [n for n, _ in ckpt.named_parameters()]
    assert plain.state_dict().keys() == ckpt.state_dict().keys()
    for name, a, b in zip(names, plain.parameters(), ckpt.parameters(), strict=True):
        assert a.grad is not None, name
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7, msg=name)
    applications = calls["plain"]
    if shape is MOR_EC3:
        assert applications == [1, 3, 1]  # prefix, shared layer × N_r, suffix
    assert calls["ckpt"] == [2 * n for n in applications]  # each application recomputed


def test_compiled_checkpointed_training_matches_eager(world_of_one: Path) -> None:
    """``compile: true`` with ``activation_checkpointing: true`` (DeepSpeed's engine.compile
    around checkpointed layers) trains a tiny expert-choice MoR through the same losses and
    routing as plain eager. The 'aot_eager' backend captures the same forward and backward
    graphs as inductor, without its minutes of code generation on a CPU."""
    import torch._dynamo

    mor_cfg = build_config(
        "micro", sharing="middle_cycle", num_recursions=2, router="expert_choice", vocab_size=VOCAB
    )
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        engine, runs[compiled] = _train(
            world_of_one,
            mor_cfg,
            {
                "compile": compiled,
                "compile_backend": "aot_eager",
                "activation_checkpointing": compiled,
            },
        )
        assert engine.is_compiled == compiled
        assert getattr(engine.module.layers[1], "_mor_checkpointed", False) == compiled
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == compiled  # the compiled run really ran captured graphs
    eager, comp = runs[False], runs[True]
    assert eager[-1].loss < eager[0].loss  # it trains
    torch.testing.assert_close(
        [r.loss for r in comp], [r.loss for r in eager], rtol=1e-5, atol=1e-5
    )
    for a, b in zip(comp, eager, strict=True):
        assert a.routing.tokens_per_depth == b.routing.tokens_per_depth


def test_bf16_zero3_checkpointed_training_matches_fp32(world_of_one: Path) -> None:
    """precision bf16 (what 'auto' picks on a GPU: DeepSpeed's bf16, bf16 weights and
    activations over fp32 master weights and AdamW state) with ZeRO-3 and activation
    checkpointing steps a tiny MoR N_r = 3 through the losses of fp32 ZeRO-2 within bf16
    tolerance; both with the fused AdamW."""
    mor_cfg = build_config("micro", vocab_size=VOCAB, **MOR_EC3)
    bf16 = {
        "deepspeed": {"precision": "bf16", "zero_stage": 3},
        "activation_checkpointing": True,
    }
    fp32_engine, fp32 = _train(world_of_one, mor_cfg, {"deepspeed": {"precision": "fp32"}})
    bf16_engine, low = _train(world_of_one, mor_cfg, bf16)
    assert next(fp32_engine.module.parameters()).dtype == torch.float32
    assert next(bf16_engine.module.parameters()).dtype == torch.bfloat16
    assert optimizer_name(fp32_engine) == optimizer_name(bf16_engine) == "AdamW (fused)"
    assert fp32[-1].loss < fp32[0].loss  # it trains
    # bf16 keeps 8 bits of mantissa (relative spacing 2^-7 ≈ 0.8%): losses agree to about that.
    torch.testing.assert_close([r.loss for r in low], [r.loss for r in fp32], rtol=1e-2, atol=0.0)


def test_a_training_forward_leaves_no_logits_for_the_backward() -> None:
    """The training forward drops the logits (B·T·V floats, 384 MiB at seq 2048 with SmolLM2's
    vocabulary): the backward keeps only the cross-entropy's log-softmax of that size, and
    the loss and gradients are those of the model's own forward."""
    from trainers.components import training_forward

    cfg = build_config("micro", vocab_size=VOCAB, max_seq_len=16, **MOR_EC3)
    torch.manual_seed(0)
    model = MoRModel(cfg).train()
    x = torch.randint(0, VOCAB, (3, 16), generator=torch.Generator().manual_seed(1))
    full = model(x, labels=x)
    full.loss.backward()
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    vocab_sized: set[int] = set()  # the storages of B·T·V-sized tensors the backward keeps

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel() >= x.numel() * VOCAB * 0.9:
            vocab_sized.add(t.untyped_storage().data_ptr())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = training_forward(model, x)
    assert out.logits is None
    assert len(vocab_sized) == 1, vocab_sized  # the log-softmax, not the logits or a copy
    out.loss.backward()
    assert out.loss.item() == pytest.approx(full.loss.item(), rel=1e-6)
    for got, want in zip((p.grad for p in model.parameters()), expected, strict=True):
        torch.testing.assert_close(got, want)
