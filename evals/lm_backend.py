"""lm-evaluation-harness backend for MoR models, registered as ``mor``.

    lm_eval --model mor --model_args pretrained=outputs/runs/NAME/export,depth=2 --tasks piqa

Routing is the model's causal inference routing (``eval()`` mode): a token's depth never
depends on later tokens, and padding is never eligible, so batching cannot change a score.
``routing=topk`` instead routes expert-choice models by training's top-k over each sequence, the
paper's (non-causal) evaluation, for comparison only: it cannot generate.
``depth`` fixes every token's recursion count (the test-time depth knob); ``max_depth`` only
caps the router. The backend accumulates routing statistics over every forward it runs, so the
caller can turn them into measured inference FLOPs per token (``mor/flops.py``).

The end-of-text id comes from the export (``meta["eos_id"]``, the id training separated
documents with), never from guessing token names: rolling windows and generation stop on it.
Log-probabilities are computed in the wider of the model's dtype and float32, so a float64
model is scored in float64 and a bf16 one does not lose the softmax's precision.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tokenizers import Tokenizer
from tqdm import tqdm

from mor.checkpoint import load_pretrained, tokenizer_file
from mor.generation import generate
from mor.model import MoRModel

DTYPES = {
    "float64": torch.float64,
    "fp64": torch.float64,
    "double": torch.float64,
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


@dataclass
class RoutingTally:
    """Token counts over every forward the backend ran (valid tokens only)."""

    tokens: int = 0
    active: list[float] = field(default_factory=list)  # tokens that ran recursion r
    per_depth: list[int] = field(default_factory=list)  # tokens that ended at depth d
    seq_tokens: int = 0  # Σ sequence lengths (for the mean attention span)
    sequences: int = 0

    def add(self, stats: Any, n_tokens: int, lengths: list[int]) -> None:
        self.seq_tokens += sum(lengths)
        self.sequences += len(lengths)
        if stats is None:  # a vanilla model: every token runs every layer
            return
        if not self.active:
            self.active = [0.0] * len(stats.active_fraction)
            self.per_depth = [0] * len(stats.tokens_per_depth)
        self.tokens += n_tokens
        self.active = [a + f * n_tokens for a, f in zip(self.active, stats.active_fraction)]
        self.per_depth = [a + b for a, b in zip(self.per_depth, stats.tokens_per_depth)]

    def active_fractions(self) -> list[float] | None:
        return [a / self.tokens for a in self.active] if self.tokens else None

    def mean_seq_len(self) -> float:
        return self.seq_tokens / self.sequences if self.sequences else 0.0


@register_model("mor")
class MoRLM(TemplateLM):
    """An exported (or in-memory) MoR model as an lm-eval ``TemplateLM``."""

    def __init__(
        self,
        pretrained: str | None = None,
        model: MoRModel | None = None,
        tokenizer: str | Tokenizer | None = None,
        depth: int | None = None,
        max_depth: int | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        batch_size: int | str = 16,
        max_length: int | None = None,
        max_gen_toks: int = 128,
        eos_id: int | None = None,
        routing: str = "causal",
        progress: bool = True,
    ) -> None:
        super().__init__()
        # lm-eval asks for bars (disable_tqdm=False); the platform's own evaluations turn
        # them off unless verbose: every bar update is a line in Ray's worker log.
        self.progress = bool(progress)
        if (pretrained is None) == (model is None):
            raise ValueError("pretrained: give exactly one of pretrained (export dir) or model")
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm-eval's command line asks for 'cuda' unless --device says otherwise; like its
            # HF backend, run where the machine can rather than fail.
            print(f"[mor] device {device!r} is not available here: using cpu", file=sys.stderr)
            device = "cpu"
        torch_dtype = _dtype(dtype, device)
        if pretrained is not None:
            model, meta = load_pretrained(pretrained, device=device, dtype=torch_dtype)
            tokenizer = tokenizer or tokenizer_file(pretrained)
            eos_id = eos_id if eos_id is not None else meta.get("eos_id")
        else:
            model = model.to(device=device, dtype=torch_dtype).eval()
        if eos_id in (None, ""):
            # Every `mor train` export records it; only a hand-made export or model lacks it.
            raise ValueError(
                "eos_id: the export records no eos_id (meta.eos_id); pass eos_id=ID, the "
                "end-of-text token the model was trained with"
            )
        if tokenizer is None:
            raise ValueError("tokenizer: the export holds no tokenizer.json; pass tokenizer=PATH")
        self.tokenizer = (
            tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_file(str(tokenizer))
        )
        if self.tokenizer.get_vocab_size() > model.cfg.vocab_size:
            raise ValueError(
                f"tokenizer: vocabulary {self.tokenizer.get_vocab_size()} exceeds the model's "
                f"vocab_size {model.cfg.vocab_size}"
            )
        self.model: MoRModel = model
        self._device = torch.device(device)
        self.depth = None if depth in (None, "", "router") else int(depth)
        self.max_depth = None if max_depth in (None, "") else int(max_depth)
        self.batch_size = int(batch_size) if str(batch_size) != "auto" else 16
        self.max_length = int(max_length or model.cfg.max_seq_len)
        self.max_gen_toks = int(max_gen_toks)
        self._eos = int(eos_id)
        if not 0 <= self._eos < model.cfg.vocab_size:
            raise ValueError(
                f"eos_id: {self._eos} is outside the vocabulary 0..{model.cfg.vocab_size - 1}"
            )
        if routing not in ("causal", "topk"):
            raise ValueError(f"routing: must be 'causal' or 'topk', got {routing!r}")
        if routing == "topk" and (model.cfg.router != "expert_choice" or self.depth):
            raise ValueError("routing: 'topk' needs an expert-choice model and no fixed depth")
        self.topk_routing = routing == "topk"
        self.tally = RoutingTally()

    # ------------------------------------------------------------------ tokenizer plumbing
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return "mor-tokenizer"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=False).ids

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=False)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def _forward(self, rows: list[list[int]]) -> torch.Tensor:
        """Log-probs [B, T, V] for right-padded rows; padding is masked out of routing."""
        t = max(len(r) for r in rows)
        ids = torch.zeros(len(rows), t, dtype=torch.long)
        mask = torch.zeros(len(rows), t, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        out = self.model(
            ids.to(self.device),
            attention_mask=mask.to(self.device),
            max_depth=self.max_depth,
            force_depth=self.depth,
            topk_routing=self.topk_routing,
        )
        self.tally.add(out.stats, int(mask.sum()), [len(r) for r in rows])
        # Never narrower than float32, never narrower than the model (float64 stays float64).
        wide = torch.promote_types(out.logits.dtype, torch.float32)
        return F.log_softmax(out.logits.to(wide), dim=-1).cpu()

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str], list[int], list[int]]],
        disable_tqdm: bool = False,
        **kw,
    ) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: the first batch shows memory problems early, and similar lengths pad less.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1] + requests[i][2]))
        bar = tqdm(
            total=len(requests), disable=disable_tqdm or not self.progress, desc="loglikelihood"
        )
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                _, ctx, cont = requests[i]
                whole = (ctx + cont)[-(self.max_length + 1) :]
                inp = whole[:-1]
                n_cont = min(len(cont), len(inp))
                rows.append(inp)
                spans.append((len(inp) - n_cont, len(inp), whole[-n_cont:]))
            logp = self._forward(rows)
            for row, i, (a, b, target) in zip(range(len(chunk)), chunk, spans):
                lp = logp[row, a:b]
                tgt = torch.tensor(target)
                score = float(lp.gather(-1, tgt[:, None]).sum())
                greedy = bool((lp.argmax(-1) == tgt).all())
                results[i] = (score, greedy)
                self.cache_hook.add_partial("loglikelihood", requests[i][0], (score, greedy))
            bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    def loglikelihood(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[tuple[float, bool]]:
        """lm-eval's (its "Tokenizing inputs" bar follows ``progress`` too)."""
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Sum of token log-likelihoods of whole documents, in windows of max_length."""
        out = []
        bar_off = disable_tqdm or not self.progress
        for req in tqdm(requests, disable=bar_off, desc="loglikelihood_rolling"):
            (text,) = req.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(
                    self.tok_encode(text), self.eot_token_id, self.max_length, 1
                )
            ]
            pairs = [((text, ""), ctx, cont) for ctx, cont in windows]
            scores = self._loglikelihood_tokens(pairs, disable_tqdm=True)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled) continuation with the KV cache, cut at the first stop string."""
        if self.topk_routing:
            raise ValueError("routing: 'topk' sees future tokens, so it cannot generate text")
        out = []
        for req in tqdm(requests, disable=disable_tqdm or not self.progress, desc="generate_until"):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
            if not kwargs.pop("do_sample", False):
                temperature = 0.0
            ctx = self.tok_encode(context)[-(self.max_length - max_new) :] or [self.eot_token_id]
            ids = torch.tensor([ctx], device=self.device)
            new = generate(
                self.model,
                ids,
                max_new_tokens=max_new,
                eos_id=self.eot_token_id,
                max_depth=self.max_depth,
                force_depth=self.depth,
                temperature=temperature,
            )[0].tolist()
            if self.eot_token_id in new:
                new = new[: new.index(self.eot_token_id)]
            text = self.tok_decode(new)
            for stop in until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
            out.append(text)
        return out


def _dtype(name: str | None, device: str) -> torch.dtype | None:
    """``auto``: bfloat16 on CUDA, else the model's own dtype (None: no cast)."""
    if name in ("auto", "", None):
        return torch.bfloat16 if str(device).startswith("cuda") else None
    if name not in DTYPES:
        raise ValueError(f"dtype: {name!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def export_path(model_ref: str, tracking_uri: str | None = None) -> str:
    """An exported model: a folder, an object-store URI of one (a run stored there), or an
    MLflow model URI (``runs:/RUN_ID/model``, ``models:/NAME/VERSION``), downloaded into the
    local cache from ``tracking_uri`` (default: ``core.endpoints``' resolution). A local
    tracking store that does not exist is an error, never created."""
    from core.mlflow_model import is_model_uri, local_export
    from core.storage import Location

    if is_model_uri(model_ref):
        from core.endpoints import missing_local_store, resolve_tracking_uri

        uri = resolve_tracking_uri(tracking_uri, "outputs")
        if (missing := missing_local_store(uri)) is not None:
            raise FileNotFoundError(
                f"{model_ref}: no tracking store at {missing} (give --tracking-uri or "
                "$MLFLOW_TRACKING_URI)"
            )
        return str(local_export(model_ref, uri))
    try:
        found = Location.parse(model_ref).child("config.json").is_file()
    except (OSError, ValueError) as exc:  # an unreachable store, a malformed URI
        raise FileNotFoundError(f"{model_ref}: cannot be read: {exc}") from None
    if not found:
        raise FileNotFoundError(f"{model_ref}: not an exported MoR model folder (no config.json)")
    return model_ref
