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

from dataclasses import dataclass

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
    logits: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor
) -> torch.Tensor:
    """Per row, keep the k[b] highest-scoring eligible tokens (training-time top-k).

    logits [B, T] float, eligible [B, T] bool, k [B] long → selected [B, T] bool.
    Padding and tokens dropped earlier are never eligible, so they never take capacity.
    """
    scores = logits.detach().float().masked_fill(~eligible, float("-inf"))
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
        valid: torch.Tensor, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """Training routing and its training-only losses; by default the inference rule."""
        return self.decide(hidden, recursion, memo, force_depth), {}

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Router z-loss over the tokens in ``mask`` (penalises large logits)."""
        raise NotImplementedError

    def route(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor, training: bool, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """The model's call for recursion r: ``train_decide`` in training, else ``decide``;
        plus the unweighted losses. ``eligible`` [B, T]: tokens still active; ``valid``: not
        padding."""
        if training:
            dec, losses = self.train_decide(hidden, recursion, memo, eligible, valid, force_depth)
        else:
            dec, losses = self.decide(hidden, recursion, memo, force_depth), {}
        if self.cfg.z_loss_coef > 0 and dec.scores is not None and eligible.any():
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
        return Decision(keep, None, memo)


def make_aux_router_net(cfg: MoRConfig) -> nn.Module:
    """The auxiliary router of §2.2.1: a lightweight MLP (hidden max(8, d/4), GELU) → 1 logit."""
    d, h = cfg.hidden_size, max(8, cfg.hidden_size // 4)
    return nn.Sequential(nn.Linear(d, h, bias=False), nn.GELU(), nn.Linear(h, 1, bias=False))


def topk_cutoff(logits: torch.Tensor, eligible: torch.Tensor, kept: int) -> torch.Tensor | None:
    """The logit threshold that keeps ``kept`` of the eligible tokens of a batch: midway between
    the kept-th and the next highest logit (None when every eligible token is kept)."""
    scores = logits.detach().float()[eligible]
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
        keep = self.inference_scores(hidden, recursion, logits) > self.inference_threshold(
            recursion
        )
        if force_depth is not None or self.cfg.capacity_schedule[recursion] >= 1.0:
            keep = torch.ones_like(keep)
        return Decision(keep, gate_values(self.cfg, logits), memo, logits)

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
        rule's own state (τ_r or the auxiliary router) learns the same selection."""
        cfg, r = self.cfg, recursion
        if cfg.capacity_schedule[r] >= 1.0:
            return self.decide(hidden, r, memo, force_depth), {}
        logits = self.nets[r](hidden).squeeze(-1)
        k = torch.tensor(
            [cfg.capacity_tokens(r, int(n)) if int(n) else 0 for n in valid.sum(-1)],
            device=hidden.device,
        )
        k = torch.minimum(k, eligible.sum(-1))
        selected = expert_choice_select(logits, eligible, k)
        losses: dict[str, torch.Tensor] = {}
        if eligible.any():
            target = selected[eligible].float()
            losses["aux"] = F.binary_cross_entropy_with_logits(logits[eligible].float(), target)
            if str(r) in self.aux_nets:
                # Detached input: this loss trains the auxiliary router and nothing else.
                aux = self.aux_nets[str(r)](hidden.detach()).squeeze(-1)
                losses["aux_router"] = F.binary_cross_entropy_with_logits(
                    aux[eligible].float(), target
                )
            if self.training and cfg.ec_inference == "calibrated":
                self._calibrate(r, logits, eligible, int(k.sum()))
        keep = torch.ones_like(selected) if force_depth is not None else selected
        return Decision(keep, gate_values(cfg, logits), memo, logits), losses

    @torch.no_grad()
    def _calibrate(self, r: int, logits: torch.Tensor, eligible: torch.Tensor, kept: int) -> None:
        """τ_r ← m·τ_r + (1 − m)·(this batch's top-k cut-off): a threshold that keeps, on text
        like the training batches, the fraction of tokens top-k keeps."""
        cut = topk_cutoff(logits, eligible, kept)
        if cut is None:
            return
        m = self.cfg.calibration_momentum if int(self.calibration_batches[r]) else 0.0
        self.threshold[r] = m * self.threshold[r] + (1 - m) * cut.to(self.threshold.dtype)
        self.calibration_batches[r] += 1

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return scores[mask].float().pow(2).mean()


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
        return Decision(depth > recursion, gate, memo, scores)

    def train_decide(
        self, hidden: torch.Tensor, recursion: int, memo: Memo, eligible: torch.Tensor,
        valid: torch.Tensor, force_depth: int | None = None,
    ) -> tuple[Decision, dict[str, torch.Tensor]]:  # fmt: skip
        """The inference choice plus, at the stack's input, the Switch-style balance loss
        N_r · Σ f_i P_i or (loss-free balancing) the load the bias update reads."""
        dec = self.decide(hidden, recursion, memo, force_depth)
        losses: dict[str, torch.Tensor] = {}
        if dec.scores is None or not valid.any():
            return dec, losses
        n_r = self.cfg.num_recursions
        counts = F.one_hot(dec.memo["depth"][valid] - 1, n_r).float().sum(0)
        if self.cfg.balancing == "loss":
            probs = dec.scores[valid].float().softmax(-1).mean(0)
            losses["balance"] = n_r * (counts / counts.sum() * probs).sum()
        elif self.training:  # never from an eval-time top-k pass
            self._load += counts
        return dec, losses

    def z_loss(self, scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return torch.logsumexp(scores[mask].float(), -1).pow(2).mean()

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
