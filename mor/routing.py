"""MoR routers (paper §2.2): expert-choice and token-choice, and their auxiliary losses.

Expert-choice (§2.2.1): one router per recursion scores the recursion's input; in training each
recursion keeps its top-k of the tokens still active (hierarchical filtering), k = capacity ·
sequence length. A top-k over the whole sequence looks at future tokens, so the router is also
trained with a BCE auxiliary loss against the selection; at inference a token continues iff its
own logit is > 0, which is causal and reproduces the selection once the aux loss has taught it.

Token-choice (§2.2.2): one router scores N_r depths for each token up front; the token runs
recursions 1..i for i = argmax. Balance comes from the Switch-style loss N_r · Σ f_i P_i or
from loss-free balancing: a non-trained bias on the logits, used only to choose, nudged after
every optimizer step toward under-loaded depths.
"""

from __future__ import annotations

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
    if cfg.gate == "softmax":
        probs = logits.float().softmax(-1)
        g = probs.gather(-1, chosen[..., None]).squeeze(-1)
    else:
        s = logits if chosen is None else logits.gather(-1, chosen[..., None]).squeeze(-1)
        g = torch.sigmoid(s.float()) if cfg.gate == "sigmoid" else torch.tanh(s.float())
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


class ExpertChoiceRouter(nn.Module):
    """One router per recursion (paper: router r scores the input H^r of recursion r)."""

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.nets = nn.ModuleList(make_router_net(cfg, 1) for _ in range(cfg.num_recursions))

    def forward(
        self, r: int, h: torch.Tensor, eligible: torch.Tensor, valid: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (selected [B,T] bool, gate [B,T], losses) for recursion r."""
        cfg = self.cfg
        logits = self.nets[r](h).squeeze(-1)
        capacity = cfg.capacity_schedule[r]
        losses: dict[str, torch.Tensor] = {}
        if capacity >= 1.0:
            # A full-capacity recursion keeps every eligible token, in training and inference.
            selected = eligible
        elif training:
            n_valid = valid.sum(-1)
            k = torch.tensor(
                [cfg.capacity_tokens(r, int(n)) if int(n) else 0 for n in n_valid],
                device=h.device,
            )
            k = torch.minimum(k, eligible.sum(-1))
            selected = expert_choice_select(logits, eligible, k)
            if eligible.any():
                # BCE aux loss (paper §2.2.1): the logit should say "selected" on its own.
                losses["aux"] = F.binary_cross_entropy_with_logits(
                    logits[eligible].float(), selected[eligible].float()
                )
        else:
            selected = eligible & (logits > 0)
        if cfg.z_loss_coef > 0 and eligible.any():
            losses["z"] = logits[eligible].float().pow(2).mean()
        return selected, gate_values(cfg, logits), losses


class TokenChoiceRouter(nn.Module):
    """One router on the recursion stack's input H^1 scoring depths 1..N_r."""

    def __init__(self, cfg: MoRConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.net = make_router_net(cfg, cfg.num_recursions)
        # Loss-free balancing bias: a buffer, never touched by the optimizer.
        self.register_buffer("bias", torch.zeros(cfg.num_recursions))
        self.register_buffer("_load", torch.zeros(cfg.num_recursions), persistent=False)

    def forward(
        self, h: torch.Tensor, valid: torch.Tensor, training: bool
    ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Returns (depth [B,T] long in 1..N_r, gate [B,T], losses)."""
        cfg = self.cfg
        logits = self.net(h)  # [B, T, N_r]
        choice_scores = logits.detach().float()
        if cfg.balancing == "loss_free":
            choice_scores = choice_scores + self.bias
        chosen = choice_scores.argmax(-1)  # 0-based depth index
        gate = gate_values(cfg, logits, chosen)
        losses: dict[str, torch.Tensor] = {}
        if training and valid.any():
            counts = F.one_hot(chosen[valid], cfg.num_recursions).float().sum(0)
            if cfg.balancing == "loss":
                probs = logits[valid].float().softmax(-1).mean(0)
                frac = counts / counts.sum()
                losses["balance"] = cfg.num_recursions * (frac * probs).sum()
            else:
                self._load += counts
        if cfg.z_loss_coef > 0 and valid.any():
            losses["z"] = torch.logsumexp(logits[valid].float(), -1).pow(2).mean()
        return chosen + 1, gate, losses

    @torch.no_grad()
    def update_bias(self) -> None:
        """Loss-free balancing step: raise the bias of under-loaded depths, lower the rest."""
        if self._load.sum() == 0:
            return
        deficit = self._load.mean() - self._load
        self.bias += self.cfg.bias_update_rate * torch.sign(deficit)
        self._load.zero_()
