"""Does the router run what it trained for, and does depth go where it is needed?

Run by every evaluation of a routed model, on held-out default-corpus text the model never
trained on (the training split's complement):

- **drift** (expert-choice): per recursion, the training capacity, the eval-mode (causal)
  active fraction, and how often the causal decision agrees with training's top-k on the same
  windows (``mor.analysis.routing_drift``; issue #14).
- **depth vs difficulty**: the Spearman correlation between each token's router depth and its
  next-token loss when every token runs all N_r recursions (positive: harder tokens get more
  depth), and the mean depth per token-frequency quartile: the paper's claim that simple,
  frequent tokens exit early (§4.3, Fig. 5).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd
import torch

from evals.default_tasks import heldout_documents
from mor.analysis import RoutingDrift, routing_drift, token_depths_and_losses
from mor.model import MoRModel

BUCKETS = ("most frequent", "frequent", "rare", "rarest")
"""Token-frequency quartiles, by how often each token's type occurs in the held-out text."""


@dataclass
class RoutingAnalysis:
    tokens: int
    """Held-out tokens analysed."""
    spearman_depth_loss: float | None
    """Spearman ρ between router depth and full-depth next-token loss (None: constant depth)."""
    by_frequency: list[dict[str, Any]] = field(default_factory=list)
    """One row per frequency quartile: bucket, tokens, mean_depth, mean_loss, examples."""
    drift: dict[str, Any] | None = None
    """Expert-choice: ``RoutingDrift`` as a dict (capacity, active, topk_active, agreement,
    recall per recursion)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics: ``routing/*`` and (expert-choice) ``drift/*``."""
        out: dict[str, float] = {}
        if self.spearman_depth_loss is not None:
            out["routing/spearman_depth_loss"] = self.spearman_depth_loss
        for i, row in enumerate(self.by_frequency):
            out[f"routing/mean_depth_q{i + 1}"] = row["mean_depth"]
        if self.drift is not None:
            out.update(RoutingDrift(**self.drift).to_metrics("drift/"))
        return out


def heldout_windows(tokenizer: Any, eos_id: int, seq_len: int, windows: int) -> torch.Tensor:
    """[n ≤ windows, seq_len] token ids: held-out documents joined by eos, cut into windows."""
    ids: list[int] = []
    for doc in heldout_documents():
        ids.extend(tokenizer.encode(doc, add_special_tokens=False).ids)
        ids.append(eos_id)
        if len(ids) >= windows * seq_len:
            break
    n = min(windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"held-out text: fewer than {seq_len} tokens to analyse")
    return torch.tensor(ids[: n * seq_len]).view(n, seq_len)


def frequency_table(
    ids: torch.Tensor, depth: torch.Tensor, loss: torch.Tensor, tokenizer: Any
) -> list[dict[str, Any]]:
    """Mean depth and loss per frequency quartile of the analysed token occurrences."""
    counts = Counter(ids.tolist())
    df = pd.DataFrame(
        {
            "id": ids.tolist(),
            "count": [counts[i] for i in ids.tolist()],
            "depth": depth.tolist(),
            "loss": loss.tolist(),
        }
    )
    # Rank occurrences from the most frequent type down (ties broken by id, deterministic).
    df = df.sort_values(["count", "id"], ascending=[False, True], kind="stable")
    df["bucket"] = pd.qcut(range(len(df)), len(BUCKETS), labels=list(BUCKETS))
    rows = []
    for bucket, part in df.groupby("bucket", observed=True, sort=False):
        top = part["id"].value_counts().index[:5]
        rows.append(
            {
                "bucket": str(bucket),
                "tokens": len(part),
                "types": int(part["id"].nunique()),
                "mean_depth": float(part["depth"].mean()),
                "mean_loss": float(part["loss"].mean()),
                "examples": [tokenizer.decode([int(i)]) for i in top],
            }
        )
    return rows


def analyse_routing(
    model: MoRModel, tokenizer: Any, eos_id: int, seq_len: int = 256, tokens: int = 4096
) -> RoutingAnalysis | None:
    """The analysis above for a routed model (None for a model without a router), on about
    ``tokens`` held-out tokens in windows of ``seq_len`` (use the training length)."""
    if model.cfg.router == "none":
        return None
    device = next(model.parameters()).device
    seq_len = min(seq_len, model.cfg.max_seq_len)
    x = heldout_windows(tokenizer, eos_id, seq_len, max(1, tokens // seq_len))
    ids, depth, loss, drifts = [], [], [], []
    for batch in x.split(4):
        batch = batch.to(device)
        i, d, lo = token_depths_and_losses(model, batch)
        ids.append(i.cpu()), depth.append(d.cpu()), loss.append(lo.cpu())
        if model.cfg.router == "expert_choice":
            drifts.append(routing_drift(model, batch))
    ids_t, depth_t, loss_t = torch.cat(ids), torch.cat(depth), torch.cat(loss)
    rho = None
    if depth_t.unique().numel() > 1:
        # Spearman ρ = Pearson correlation of the (tie-averaged) ranks.
        ranks = pd.DataFrame({"depth": depth_t.tolist(), "loss": loss_t.tolist()}).rank()
        rho = float(ranks["depth"].corr(ranks["loss"]))
    return RoutingAnalysis(
        tokens=int(ids_t.numel()),
        spearman_depth_loss=rho,
        by_frequency=frequency_table(ids_t, depth_t, loss_t, tokenizer),
        drift=asdict(RoutingDrift.mean(drifts)) if drifts else None,
    )
