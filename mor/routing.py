"""MoR routers (paper §2.2): expert-choice and token-choice, and their auxiliary losses.

Expert-choice (§2.2.1): one router per recursion scores the recursion's input; in training each
recursion keeps its top-k of the tokens still active (hierarchical filtering), k = capacity ·
sequence length. A top-k over the whole sequence looks at future tokens, so the router is also
trained with a BCE auxiliary loss against the selection; at inference a token continues iff its
own score passes a threshold, which is causal: logit > 0 (what the aux loss aims for), logit > a
threshold calibrated to training's top-k cut-off, or an auxiliary router's logit > 0
(``MoRConfig.ec_inference``; the measurement behind the default is in the README).

Token-choice (§2.2.2): one router scores N_r depths for each token up front; the token runs
recursions 1..i for i = argmax. Balance comes from the Switch-style loss N_r · Σ f_i P_i or
from loss-free balancing: a non-trained bias on the logits, used only to choose, nudged after
every optimizer step toward under-loaded depths.

Every router answers ``Router.decide``: the one causal, per-token inference rule, used by both
``MoRModel.forward`` in ``eval()`` mode and the depth-wise batching engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from mor.config import MoRConfig


def make_router_net(cfg: MoRConfig, n_out: int) -> nn.Module:
    d = cfg.hidden_size
    if cfg.router_network == "linear":
        return nn.Linear(d, n_out, bias=False)
    return nn.Sequential(
        nn.Linear(d, 2 * d, bias=False), nn.GELU(), nn.Linear(2 * d, n_out, bias=False)
    )


def gate_values(
    cfg: MoRConfig, logits: torch.Tensor, chosen: torch.Tensor | None = None
) -> torch.Tensor:
    """g = α · gate(logit). For token-choice ``logits`` is [..., N_r] and ``chosen`` the index."""
    dt = torch.promote_types(logits.dtype, torch.float32)  # bf16 → fp32; fp64 stays
    if cfg.gate == "softmax":
        probs = logits.to(dt).softmax(-1)
        g = probs.gather(-1, chosen[..., None]).squeeze(-1)
    else:
        s = logits if chosen is None else logits.gather(-1, chosen[..., None]).squeeze(-1)
        g = torch.sigmoid(s.to(dt)) if cfg.gate == "sigmoid" else torch.tanh(s.to(dt))
    return (cfg.gate_scale * g).to(logits.dtype)


def expert_choice_select(
    logits: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor | int
) -> torch.Tensor:
    """Per row, keep the k[b] highest-scoring eligible tokens (training-time top-k).

    logits [B, T] float, eligible [B, T] bool, k [B] long → selected [B, T] bool.
    Padding and tokens dropped earlier are never eligible, so they never take capacity.
    An int ``k`` (packed batches: the same k for every row, at most the eligible tokens of
    each row) needs no host sync: the top-k has a static width.
    """
    scores = logits.detach().float().masked_fill(~eligible, float("-inf"))
    if isinstance(k, int):
        top = scores.topk(k, dim=-1).indices
        return torch.zeros_like(eligible).scatter_(1, top, True)
    # Padded rows keep different k (capacity · their own length): the width is read back.
    k_max = int(k.max()) if k.numel() else 0
    if k_max == 0:
        return torch.zeros_like(eligible)
    top = scores.topk(k_max, dim=-1).indices  # [B, k_max], descending score
    keep = torch.arange(k_max, device=logits.device)[None, :] < k[:, None]
    selected = torch.zeros_like(eligible)
    selected.scatter_(1, top, keep)
    return selected & eligible


Memo = dict[str, torch.Tensor]
"""Per-token state a router carries from recursion to recursion (token-choice: the depth and
gate chosen at the stack's input). Every tensor is indexed like the tokens ([...] leading dims),
so a caller can keep it per token, e.g. the engine per slot."""


@dataclass
class Decision:
    """One router decision for recursion r over tokens of any leading shape [...]."""

    keep: torch.Tensor
    """[...] bool: the token runs recursion r if it is still active (the caller ANDs)."""
    gate: torch.Tensor | None
    """[...] g weighting recursion r's update, H + g·f(H); None = ungated (no router)."""
    memo: Memo
    """State for the next recursions: pass it back to the next ``decide``."""
    scores: torch.Tensor | None = None
    """The router logits computed for this decision (losses read them), if any."""
    # Host-side hints (set with ``known``) that let the model gather with static shapes and
    # no host sync. Not init fields: ``dataclasses.replace`` does not copy them, so a rule
    # that derives a new ``keep`` from a decision (an override of ``decide``) drops them and
    # the model counts on the device, as it must.
    keeps_all: bool = field(default=False, init=False)
    """Known on the host: ``keep`` is True everywhere (no router, a full-capacity recursion,
    a forced depth), so the caller's active set and its size do not change."""
    kept: int | None = field(default=None, init=False)
    """Known on the host: every row has exactly this many tokens with keep ∧ eligible
    (expert-choice training on packed batches: its static top-k); None when the count
    depends on the data."""

    def known(self, keeps_all: bool = False, kept: int | None = None) -> Decision:
        """This decision with its host-side hints (``keeps_all``, ``kept``) set."""
        self.keeps_all, self.kept = keeps_all, kept
        return self


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the entries in ``mask`` (0 when none), with static shapes: the
    same value as ``x[mask].mean()`` without a data-dependent shape (no host sync)."""
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1)


class Router(nn.Module):
    """What the model and the engine ask a router. ``decide`` is the one inference rule.

    ``decide`` is causal and per token: a token's decision depends only on its own hidden state
    (and its memo), so incremental decoding, the batched engine and a full forward agree. Both
    ``MoRModel.forward`` in ``eval()`` mode and ``DepthwiseBatchingEngine`` call it, so a new
    inference rule (a calibrated threshold, an auxiliary router: ``cfg.ec_inference``) is a
    ``decide`` override and nothing else. Training may decide differently (expert-choice top-k
    over the sequence): ``train_decide``, reached through ``route``.
    """

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, force_depth: int | None = None
    ) -> Decision:
        """Which tokens of ``hidden`` [..., d] (H^r, the input of recursion ``recursion``)
        continue and with which gate. ``memo``: the previous decision's (``{}`` at r = 0).
        ``force_depth``: every token runs exactly that many recursions (the caller stops
        there); the router's gates still weigh the updates."""
        raise NotImplementedError

    def train_decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor | None, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """Training routing and its training-only losses; by default the inference rule.
        ``valid`` None: a packed batch (no padding), where shapes and per-row counts are
        known on the host and the routing must not read the device."""
        return self.decide(hidden, recursion, memo, force_depth), {}

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Router z-loss over the tokens in ``mask`` (penalises large logits)."""
        raise NotImplementedError

    def route(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor | None, training: bool, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """The model's call for recursion r: ``train_decide`` in training, else ``decide``;
        plus the unweighted losses. ``eligible`` [B, T]: tokens still active; ``valid``: not
        padding, None for a packed batch (no padding)."""
        if training:
            dec, losses = self.train_decide(hidden, recursion, memo, eligible, valid, force_depth)
        else:
            dec, losses = self.decide(hidden, recursion, memo, force_depth), {}
        if self.cfg.z_loss_coef > 0 and dec.scores is not None:
            # Training on a packed batch always has eligible tokens wherever a router scores
            # (top-k keeps k ≥ 1 per row); otherwise ask the device (padding, inference).
            if (training and valid is None) or bool(eligible.any()):
                losses["z"] = self.z_loss(dec.scores, eligible)
        return dec, losses

    def update_bias(self) -> None:
        """After each optimizer step (loss-free balancing); nothing for most routers."""


class NoRouter(Router):
    """router='none': every token runs every recursion, ungated (the plain recursive model)."""

    def decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, force_depth: int | None = None
    ) -> Decision:
        keep = torch.ones(hidden.shape[:-1], dtype=torch.bool, device=hidden.device)
        return Decision(keep, None, memo).known(keeps_all=True)


def make_aux_router_net(cfg: MoRConfig) -> nn.Module:
    """The auxiliary router of §2.2.1: a lightweight MLP (hidden max(8, d/4), GELU) → 1 logit."""
    d, h = cfg.hidden_size, max(8, cfg.hidden_size // 4)
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, 1, bias=False))


def topk_cutoff(logits: torch.Tensor, eligible: torch.Tensor, kept: int) -> torch.Tensor | None:
    """The logit threshold that keeps ``kept`` of the eligible tokens of a batch: midway between
    the kept-th and the next highest logit; -inf when every eligible token is kept (None when
    that is known on the host). Static shapes: ineligible tokens score -inf (no host sync)."""
    scores = logits.detach().float().masked_fill(~eligible, float("-inf")).flatten()
    if kept >= scores.numel() or kept <= 0:
        return None
    top = scores.topk(kept + 1).values
    return (top[-2] + top[-1]) / 2


class ExpertChoiceRouter(Router):
    """One router per recursion (paper: router r scores the input H^r of recursion r).

    Inference rule (``cfg.ec_inference``): the main logit > 0, the main logit > a calibrated
    threshold τ_r, or an auxiliary router's logit > 0. Only recursions with capacity < 1 ever
    drop tokens, so only they get an auxiliary router and a threshold.
    """

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__(cfg)
        n_r = cfg.num_recursions
        self.nets = nn.ModuleList(make_router_net(cfg, 1) for _ in range(n_r))
        self.routed = [r for r in range(n_r) if cfg.capacity_schedule[r] < 1.0]
        self.aux_nets = nn.ModuleDict()
        if cfg.ec_inference == "aux_router":
            # Off the global RNG stream, so the main model starts from the same weights as
            # with any other rule (MoRModel initialises these last, also off the stream).
            with torch.random.fork_rng(devices=[]):
                self.aux_nets.update({str(r): make_aux_router_net(cfg) for r in self.routed})
        if cfg.ec_inference == "calibrated":
            # τ_r and how many training batches have updated it (0: not yet, τ_r = 0 = the
            # plain threshold rule). Buffers: saved in the export, never optimized.
            self.register_buffer("threshold", torch.zeros(n_r))
            self.register_buffer("calibration_batches", torch.zeros(n_r, dtype=torch.long))

    def decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, force_depth: int | None = None
    ) -> Decision:
        """Causal rule: a token continues iff its own score passes ``cfg.ec_inference``'s
        threshold; a full-capacity recursion (or a forced depth) keeps every token."""
        logits = self.nets[recursion](hidden).squeeze(-1)
        keeps_all = force_depth is not None or self.cfg.capacity_schedule[recursion] >= 1.0
        if keeps_all:
            keep = torch.ones(logits.shape, dtype=torch.bool, device=logits.device)
        else:
            threshold = self.inference_threshold(recursion)
            keep = self.inference_scores(hidden, recursion, logits) > threshold
        return Decision(keep, gate_values(self.cfg, logits), memo, logits).known(keeps_all)

    def inference_scores(
        self, hidden: torch.Tensor, recursion: int, logits: torch.Tensor
    ) -> torch.Tensor:
        """What the inference rule thresholds: the auxiliary router's logit, else the main one."""
        if str(recursion) in self.aux_nets:
            return self.aux_nets[str(recursion)](hidden).squeeze(-1)
        return logits

    def inference_threshold(self, recursion: int) -> torch.Tensor | float:
        if self.cfg.ec_inference == "calibrated":
            return self.threshold[recursion]
        return 0.0

    def train_decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """Each row keeps its top-k eligible tokens, k = capacity · valid tokens; the BCE aux
        loss (paper §2.2.1) teaches each logit to say "selected" on its own, and the inference
        rule's own state (τ_r or the auxiliary router) learns the same selection.

        Packed batches (``valid`` None, the training case): k = ⌈capacity · T⌉ is the same
        Python int for every row and never exceeds the eligible tokens (capacities do not
        increase), so nothing here reads the device. Padded batches read each row's k back."""
        cfg, r = self.cfg, recursion
        if cfg.capacity_schedule[r] >= 1.0:
            return self.decide(hidden, r, memo, force_depth), {}
        logits = self.nets[r](hidden).squeeze(-1)
        if valid is None:
            k: torch.Tensor | int = cfg.capacity_tokens(r, hidden.shape[1])
            kept = k * hidden.shape[0]
        else:
            k = torch.tensor(
                [cfg.capacity_tokens(r, int(n)) if int(n) else 0 for n in valid.sum(-1)],
                device=hidden.device,
            )
            k = torch.minimum(k, eligible.sum(-1))
            kept = int(k.sum())
        selected = expert_choice_select(logits, eligible, k)
        losses: dict[str, torch.Tensor] = {}
        if valid is None or bool(eligible.any()):
            target = selected.float()
            bce = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
            losses["aux"] = masked_mean(bce, eligible)
            if str(r) in self.aux_nets:
                # Detached input: this loss trains the auxiliary router and nothing else.
                aux = self.aux_nets[str(r)](hidden.detach()).squeeze(-1)
                bce = F.binary_cross_entropy_with_logits(aux.float(), target, reduction="none")
                losses["aux_router"] = masked_mean(bce, eligible)
            if self.training and cfg.ec_inference == "calibrated":
                self._calibrate(r, logits, eligible, kept)
        if force_depth is not None:
            keep = torch.ones_like(selected)
            dec = Decision(keep, gate_values(cfg, logits), memo, logits).known(keeps_all=True)
        else:
            kept_per_row = k if isinstance(k, int) else None
            dec = Decision(selected, gate_values(cfg, logits), memo, logits)
            dec = dec.known(kept=kept_per_row)
        return dec, losses

    @torch.no_grad()
    def _calibrate(self, r: int, logits: torch.Tensor, eligible: torch.Tensor, kept: int) -> None:
        """τ_r ← m·τ_r + (1 − m)·(this batch's top-k cut-off): a threshold that keeps, on text
        like the training batches, the fraction of tokens top-k keeps. Written with tensor
        ops (no host sync): a batch whose top-k keeps every eligible token leaves τ_r as is."""
        cut = topk_cutoff(logits, eligible, kept)
        if cut is None:
            return
        seen = self.calibration_batches[r] > 0
        m = torch.where(seen, self.cfg.calibration_momentum, 0.0).to(self.threshold.dtype)
        new = m * self.threshold[r] + (1 - m) * cut.to(self.threshold.dtype)
        ok = torch.isfinite(cut)
        self.threshold[r] = torch.where(ok, new, self.threshold[r])
        self.calibration_batches[r] += ok.long()

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(scores.float().pow(2), mask)


class TokenChoiceRouter(Router):
    """One router on the recursion stack's input H^1 scoring depths 1..N_r."""

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__(cfg)
        self.net = make_router_net(cfg, cfg.num_recursions)
        # Loss-free balancing bias: a buffer, never touched by the optimizer.
        self.register_buffer("bias", torch.zeros(cfg.num_recursions))
        self.register_buffer("_load", torch.zeros(cfg.num_recursions), persistent=False)

    def decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, force_depth: int | None = None
    ) -> Decision:
        """At recursion 0 (the stack's input) choose depth i = argmax and its gate, kept in the
        memo; recursion r keeps tokens of depth > r, and the gate weighs only the token's last
        recursion (its chosen "expert"). ``force_depth`` replaces the depth, not the gate."""
        scores = None
        if recursion == 0:
            scores = self.net(hidden)  # [..., N_r]
            choice = scores.detach().float()
            if self.cfg.balancing == "loss_free":
                choice = choice + self.bias
            chosen = choice.argmax(-1)  # 0-based depth index
            memo = {"depth": chosen + 1, "gate": gate_values(self.cfg, scores, chosen)}
        depth, gate = memo["depth"], memo["gate"]
        if force_depth is not None:
            depth = torch.full_like(depth, force_depth)
        last = depth == recursion + 1
        gate = torch.where(last, gate, torch.ones_like(gate))
        # Every depth is ≥ 1, so recursion 0 keeps every token (known on the host).
        keeps_all = recursion == 0 or (force_depth is not None and recursion < force_depth)
        return Decision(depth > recursion, gate, memo, scores).known(keeps_all)

    def train_decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """The inference choice plus, at the stack's input, the Switch-style balance loss
        N_r · Σ f_i P_i or (loss-free balancing) the load the bias update reads.

        Packed batches (``valid`` None) never read the device here; the depths a token chose
        still differ per row, so the model's gathers read the widest row (``_recursion``)."""
        dec = self.decide(hidden, recursion, memo, force_depth)
        losses: dict[str, torch.Tensor] = {}
        if dec.scores is None or (valid is not None and not bool(valid.any())):
            return dec, losses
        n_r = self.cfg.num_recursions

        def flat(t: torch.Tensor) -> torch.Tensor:  # the valid tokens' rows
            return t.reshape(-1, *t.shape[2:]) if valid is None else t[valid]

        depth = flat(dec.memo["depth"])
        counts = (depth[:, None] - 1 == torch.arange(n_r, device=depth.device)).float().sum(0)
        if self.cfg.balancing == "loss":
            probs = flat(dec.scores).float().softmax(-1).mean(0)
            losses["balance"] = n_r * (counts / counts.sum() * probs).sum()
        elif self.training:  # never from an eval-time top-k pass
            self._load += counts
        return dec, losses

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_mean(torch.logsumexp(scores.float(), -1).pow(2), mask)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step: raise the bias of under-loaded depths, lower the rest."""
        if self._load.sum() == 0:
            return
        deficit = self._load.mean() - self._load
        self.bias += self.cfg.bias_update_rate * torch.sign(deficit)
        self._load.zero_()


def make_router(cfg: MoRConfig) -> Router:
    """The router ``cfg.router`` names."""
    routers = {
        "none": NoRouter,
        "expert_choice": ExpertChoiceRouter,
        "token_choice": TokenChoiceRouter,
    }
    return routers[cfg.router](cfg)
