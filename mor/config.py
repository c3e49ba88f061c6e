"""The one typed config of a Mixture-of-Recursions model, with the paper's named presets.

Every field carries its docstring (shown by ``mor inspect --help-fields`` and in errors). A
config is built from a preset, then a YAML file, then dotted overrides (``mor.overrides``).
Invalid combinations raise ``ConfigError`` naming the field and the allowed values.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, NoReturn

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mor.overrides import ConfigError, apply_overrides, load_yaml, validate

Sharing = Literal["none", "cycle", "sequence", "middle_cycle", "middle_sequence"]
Router = Literal["none", "expert_choice", "token_choice"]
RouterNetwork = Literal["linear", "mlp"]
Gate = Literal["sigmoid", "tanh", "softmax"]
Balancing = Literal["loss", "loss_free"]
KVCacheMode = Literal["recursion_wise", "shared"]
ECInference = Literal["threshold", "calibrated", "aux_router"]


def bad(field: str, msg: str) -> NoReturn:
    """A config error naming its field (pydantic reports it as a validation error)."""
    raise ValueError(f"{field}: {msg}")


class MoRConfig(BaseModel):
    """Shape, parameter sharing, routing and KV-caching of one MoR language model."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    # ----------------------------------------------------------------- backbone (Llama style)
    vocab_size: int = Field(49152, ge=2)
    """Size of the token vocabulary (SmolLM2's tokenizer has 49152)."""
    hidden_size: int = Field(576, ge=8)
    """Model width d."""
    num_layers: int = Field(30, ge=1)
    """Number of *unrolled* layers L: the depth a token gets at full recursion. Vanilla
    models have L unique layers; recursive models have fewer unique layers (see sharing)."""
    num_heads: int = Field(9, ge=1)
    """Attention (query) heads; hidden_size must be a multiple of it."""
    num_kv_heads: int = Field(3, ge=1)
    """Key/value heads for grouped-query attention; must divide num_heads."""
    ffn_size: int = Field(1536, ge=1)
    """Inner width of the SwiGLU feed-forward block."""
    max_seq_len: int = Field(2048, ge=1)
    """Longest sequence (context length) the model is trained and evaluated on."""
    rope_base: float = Field(10000.0, gt=1.0)
    """Base of the rotary position embedding frequencies."""
    norm_eps: float = Field(1e-5, gt=0.0)
    """Epsilon of RMSNorm."""
    tie_embeddings: bool = True
    """Share the input embedding matrix with the LM head (as SmolLM does)."""
    init_std: float = Field(0.02, gt=0.0)
    """Standard deviation of the normal weight initialisation."""

    # ----------------------------------------------------------------- parameter sharing (§2.1)
    sharing: Sharing = "none"
    """How unrolled layers map to unique layers: 'none' (vanilla), 'cycle' [0,1,2,0,1,2],
    'sequence' [0,0,1,1,2,2], 'middle_cycle' / 'middle_sequence' (first and last layer unique,
    the middle shared by cycle / sequence). Middle-cycle is the paper's best."""
    num_recursions: int = Field(1, ge=1)
    """N_r: how many times the shared recursion block is applied at full depth."""

    # ----------------------------------------------------------------- routing (§2.2)
    router: Router = "none"
    """'none' (plain recursive transformer: every token gets every recursion), 'expert_choice'
    (each recursion keeps its top-k tokens) or 'token_choice' (each token picks its depth)."""
    router_network: RouterNetwork = "linear"
    """Router architecture: one linear layer, or a 2-layer MLP (hidden 2·d, GELU)."""
    gate: Gate = "sigmoid"
    """Gate function g turning router logits into the update weight. 'softmax' only exists for
    token-choice (a softmax over the N_r depths)."""
    gate_scale: float = Field(1.0, gt=0.0)
    """α, the scale applied to the gate value: g = α · gate(logit)."""
    capacities: tuple[float, ...] | None = None
    """Expert-choice only: the fraction of the sequence's tokens each recursion keeps, one per
    recursion, non-increasing, in (0, 1]. Default (N_r − r)/N_r for r = 0..N_r−1."""
    aux_loss_coef: float = Field(0.001, ge=0.0)
    """Expert-choice: weight of the BCE auxiliary loss that teaches the router's logits to
    reproduce the top-k selection, so a per-token threshold is causal at inference."""
    ec_inference: ECInference = "calibrated"
    """Expert-choice: the causal rule that decides at inference whether a token continues
    (§2.2.1; training always keeps the top-k). 'threshold': its router logit > 0, what the aux
    loss aims for, but a weak aux loss leaves the zero point shifted and the model runs
    shallower than it trained (issue #14). 'calibrated' (default, measured best): its logit >
    τ_r, where τ_r is a running average over training batches of the top-k cut-off (midway
    between the k-th and (k+1)-th highest eligible logit), saved with the weights, so the
    eval-mode active fraction matches the capacity by construction. 'aux_router': the paper's
    auxiliary router, a small MLP per recursion trained with BCE on *detached* hidden states to
    predict the top-k selection (so it never disturbs the main router), deciding by its own
    logit > 0. Every option is causal. Other routers keep the default (a sweep axis over it
    drops them with ``skip_invalid``)."""
    calibration_momentum: float = Field(0.5, ge=0.0, lt=1.0)
    """ec_inference='calibrated': momentum m of the threshold's running average
    τ ← m·τ + (1 − m)·cut-off (the first batch sets τ). One batch's cut-off is already a
    precise quantile; what averaging adds is lag while the router still moves: on the
    quickstart models m = 0.9 left the third recursion 0.04–0.08 too active, m = 0.5 (≈ the
    last two micro-batches) tracks the final router (README, router-inference benchmark)."""
    z_loss_coef: float = Field(0.0, ge=0.0)
    """Weight of the router z-loss (penalises large router logits); 0 disables it."""
    balancing: Balancing = "loss"
    """Token-choice load balancing: 'loss' (auxiliary balancing loss) or 'loss_free' (a
    non-trained bias on the router logits, updated after each optimizer step)."""
    balancing_coef: float = Field(0.1, ge=0.0)
    """Token-choice, balancing='loss': weight of the balancing loss N_r · Σ_i f_i · P_i."""
    bias_update_rate: float = Field(0.001, ge=0.0)
    """Token-choice, balancing='loss_free': step size of the bias update b_i += u · sign(load
    deficit of depth i)."""

    # ----------------------------------------------------------------- KV caching (§2.3)
    kv_cache: KVCacheMode = "recursion_wise"
    """'recursion_wise': attention at depth r sees only the tokens active at r (and caches only
    them). 'shared': depths r > 1 reuse the first recursion's keys and values."""

    @model_validator(mode="after")
    def _check(self) -> MoRConfig:
        """Cross-field rules; each error names its field and what would be valid."""
        self._check_heads()
        if self.sharing == "none":
            self._check_vanilla()
        else:
            self._check_sharing()
        self._check_router_options()
        return self

    def _check_heads(self) -> None:
        if self.hidden_size % self.num_heads:
            bad(
                "hidden_size", f"{self.hidden_size} is not a multiple of num_heads={self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            bad("hidden_size", "head dimension hidden_size/num_heads must be even for RoPE")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"{self.num_kv_heads} must divide num_heads={self.num_heads}")

    def _check_vanilla(self) -> None:
        n_r = self.num_recursions
        if n_r != 1:
            bad(
                "num_recursions",
                f"must be 1 when sharing='none' (got {n_r}); choose sharing "
                "from 'cycle', 'sequence', 'middle_cycle', 'middle_sequence'",
            )
        if self.router != "none":
            bad(
                "router",
                f"{self.router!r} needs a recursive model: set sharing to one of "
                "'cycle', 'sequence', 'middle_cycle', 'middle_sequence'",
            )
        if self.kv_cache == "shared":
            bad(
                "kv_cache",
                "'shared' reuses the first recursion's KV and needs sharing != "
                "'none'; use 'recursion_wise'",
            )

    def _check_sharing(self) -> None:
        n_r, n_l = self.num_recursions, self.num_layers
        if n_r < 2:
            bad("num_recursions", f"must be >= 2 with sharing={self.sharing!r} (got {n_r})")
        middle = self.sharing.startswith("middle")
        shared_layers = n_l - 2 if middle else n_l
        if middle and n_l < 2 + n_r:
            bad(
                "num_layers",
                f"{n_l} is too few for {self.sharing!r} with {n_r} recursions: "
                f"need at least {2 + n_r} (first + last unique, one layer per recursion)",
            )
        if shared_layers % n_r:
            what = "num_layers - 2" if middle else "num_layers"
            bad(
                "num_layers",
                f"{what} = {shared_layers} must be divisible by "
                f"num_recursions={n_r} for sharing={self.sharing!r}",
            )

    def _check_router_options(self) -> None:
        n_r = self.num_recursions
        if self.gate == "softmax" and self.router != "token_choice":
            bad(
                "gate",
                "'softmax' is only defined for router='token_choice' (a softmax over "
                "depths); use 'sigmoid' or 'tanh'",
            )
        default_rule = MoRConfig.model_fields["ec_inference"].default
        if self.router != "expert_choice" and self.ec_inference != default_rule:
            bad("ec_inference", "only applies to router='expert_choice'")
        if self.capacities is not None:
            if self.router != "expert_choice":
                bad("capacities", "only apply to router='expert_choice'")
            caps = self.capacities
            if len(caps) != n_r:
                bad("capacities", f"needs one value per recursion ({n_r}), got {len(caps)}")
            if any(not (0.0 < c <= 1.0) for c in caps):
                bad("capacities", f"each value must lie in (0, 1], got {list(caps)}")
            if any(b > a for a, b in itertools.pairwise(caps)):
                bad(
                    "capacities",
                    f"must be non-increasing (hierarchical filtering), got {list(caps)}",
                )

    # ----------------------------------------------------------------- derived quantities
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_prefix_layers(self) -> int:
        """Unique layers before the recursion block (1 for the middle variants)."""
        return 1 if self.sharing.startswith("middle") else 0

    @property
    def num_suffix_layers(self) -> int:
        """Unique layers after the recursion block (1 for the middle variants)."""
        return self.num_prefix_layers

    @property
    def recursion_depth(self) -> int:
        """Unrolled layers per recursion (the base depth of the shared block)."""
        shared = self.num_layers - self.num_prefix_layers - self.num_suffix_layers
        return shared // self.num_recursions

    @property
    def layer_map(self) -> list[int]:
        """Unique-layer index of each unrolled layer (paper §2.1, Fig. 2)."""
        n_l, n_r = self.num_layers, self.num_recursions
        if self.sharing == "none":
            return list(range(n_l))
        pre = self.num_prefix_layers
        base = self.recursion_depth
        middle = []
        for m in range(n_l - 2 * pre):
            if self.sharing.endswith("cycle"):
                middle.append(pre + m % base)
            else:  # sequence: each unique layer repeated N_r times in a row
                middle.append(pre + m // n_r)
        if pre:
            return [0, *middle, pre + base]
        return middle

    @property
    def num_unique_layers(self) -> int:
        return len(set(self.layer_map))

    def recursion_layers(self, r: int) -> list[int]:
        """Unique-layer indices applied, in order, by recursion r (0-based)."""
        start = self.num_prefix_layers + r * self.recursion_depth
        return self.layer_map[start : start + self.recursion_depth]

    @property
    def capacity_schedule(self) -> tuple[float, ...]:
        """Per-recursion capacity: the configured one, else (N_r − r)/N_r (paper §2.2.1)."""
        if self.capacities is not None:
            return tuple(self.capacities)
        n_r = self.num_recursions
        return tuple((n_r - r) / n_r for r in range(n_r))

    def expected_active_fractions(self) -> tuple[float, ...]:
        """Fraction of tokens that run each recursion, before seeing data.

        Expert-choice: the capacities. Token-choice: a balanced router sends 1/N_r of the tokens
        to each depth, so (N_r − r)/N_r reach recursion r. No router: every token, every time.
        """
        n_r = self.num_recursions
        if self.router == "expert_choice":
            return self.capacity_schedule
        if self.router == "token_choice":
            return tuple((n_r - r) / n_r for r in range(n_r))
        return tuple(1.0 for _ in range(n_r))

    def capacity_tokens(self, r: int, n_tokens: int) -> int:
        """Tokens kept at recursion r out of a sequence of n_tokens (at least one)."""
        return max(1, min(n_tokens, math.ceil(self.capacity_schedule[r] * n_tokens - 1e-9)))


_SMOLLM = dict(vocab_size=49152, max_seq_len=2048, tie_embeddings=True)
# Paper Table 5 / SmolLM shapes.
PRESETS: dict[str, dict[str, Any]] = {
    "smollm-135m": dict(
        _SMOLLM, num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3, ffn_size=1536
    ),
    "smollm-360m": dict(
        _SMOLLM, num_layers=32, hidden_size=960, num_heads=15, num_kv_heads=5, ffn_size=2560
    ),
    "smollm-730m": dict(
        _SMOLLM, num_layers=26, hidden_size=1536, num_heads=24, num_kv_heads=8, ffn_size=4096
    ),
    "smollm-1.7b": dict(
        _SMOLLM, num_layers=24, hidden_size=2048, num_heads=32, num_kv_heads=32, ffn_size=8192
    ),
    # Tiny shapes that train in seconds to minutes on a CPU; vocab matches the default corpus's
    # locally trained BPE tokenizer.
    "tiny": dict(
        vocab_size=4096,
        max_seq_len=256,
        num_layers=6,
        hidden_size=128,
        num_heads=4,
        num_kv_heads=2,
        ffn_size=344,
    ),
    "micro": dict(
        vocab_size=512,
        max_seq_len=64,
        num_layers=4,
        hidden_size=32,
        num_heads=4,
        num_kv_heads=2,
        ffn_size=64,
    ),
}
# MoR presets: the paper's best recipe on top of a shape.
PRESETS["tiny-mor"] = dict(
    PRESETS["tiny"], sharing="middle_cycle", num_recursions=2, router="expert_choice"
)
PRESETS["smollm-360m-mor3"] = dict(
    PRESETS["smollm-360m"], sharing="middle_cycle", num_recursions=3, router="expert_choice"
)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset_dict(name: str) -> dict[str, Any]:
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset: unknown preset {name!r}; choose one of {preset_names()}")
    return dict(PRESETS[name])


def build_config(
    preset: str | None = None,
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    **fields: Any,
) -> MoRConfig:
    """Preset, then YAML file, then dotted overrides, then keyword fields; validated."""
    data: dict[str, Any] = preset_dict(preset) if preset else {}
    if path is not None:
        file_data = load_yaml(path)
        if "preset" in file_data:
            data = {**preset_dict(file_data.pop("preset")), **data}
        data.update(file_data)
    data = apply_overrides(data, overrides)
    if "preset" in data:
        data = {**preset_dict(data.pop("preset")), **data}
    data.update(fields)
    return validate(MoRConfig, data)


def field_docs() -> dict[str, str]:
    """Field name → its docstring, for help texts."""
    return {name: (f.description or "") for name, f in MoRConfig.model_fields.items()}
