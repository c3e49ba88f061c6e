"""The MLflow vocabulary shared across packages: metric-key formats, tag and param names.

Trainers and evals write these keys, sweeps and dashboards read them back, in other processes
and often much later (a report over last week's sweeps). Each format is built and parsed here
only, so a writer and its readers cannot drift apart.

Layout: a sweep's parent run (``TAG_KIND = KIND_SWEEP``) → one training run per trial
(``TAG_LABEL`` = the trial's grid point) → one eval run per trained model
(``TAG_KIND = KIND_EVAL``) holding, per test-time depth point, ``eval/d<point>/<key>``, and the
same values as a series over the points under ``eval/<key>``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

# --- tags ------------------------------------------------------------------------------------
TAG_KIND = "mor.kind"
"""What a run is: ``KIND_SWEEP`` (a sweep's parent) or ``KIND_EVAL`` (an evaluation)."""
KIND_SWEEP = "sweep"
KIND_EVAL = "eval"
TAG_LABEL = "mor.label"
"""A sweep trial's grid point, e.g. ``mor-ec,budget=6e+09`` (set by the sweep driver)."""
TAG_REPLICATE_OF = "mor.replicate_of"
"""A sweep trial's grid point without its seed: the runs of one configuration's replicates
share it (``seeds:`` in the spec), and the report aggregates over them."""
TAG_SEED = "mor.seed"
"""A sweep trial's seed (initialisation and data order)."""
TAG_EVAL_RUN_ID = "mor.eval_run_id"
"""On a training run: its finished evaluation run (one eval per trained model)."""
TAG_FAILURE = "mor.failure"
"""On a failed training run: why it stopped."""
TAG_EXPORT_DIR = "mor.export_dir"
"""On a training run: the folder of its exported model."""
TAG_INTERRUPTED = "mor.interrupted"
"""On a run a killed sweep driver left RUNNING, marked KILLED on resume."""
TAG_STOPPED_EARLY = "mor.stopped_early"
"""On a sweep trial's training run stopped by ASHA: the FLOPs of the rung it was stopped at
(the run is KILLED: a partial result, never a finished model)."""
TAG_BEST_LABEL = "mor.best_label"
"""On a sweep's parent run: the label of its best finished trial (by the spec's ``metric``)."""
TAG_SKIPPED = "mor.skipped"
"""On a sweep's parent run: how many searcher draws were invalid and never started (their
reasons: the artifact ``skipped.jsonl``)."""
TAG_RESUMED_FROM_STEP = "mor.resumed_from_step"
"""On a training run restarted from a checkpoint: the step it resumed at."""
TAG_RUN_NAME = "mor.run_name"
"""On a training run: its internal name (``TrainConfig.name``: the storage folder
``runs/<name>`` and its writer lock), what code searches by. ``mlflow.runName`` is for people
and may differ: a sweep trial's is its variant and budget (``mor-ec-middle-cycle-3 @ 2e12``)."""
TAG_OPTIMIZER = "mor.optimizer"
TAG_PRECISION = "mor.precision"
"""On a training run: what its workers actually ran, set by rank 0 at start: the optimizer
and its kernel (``AdamW (fused)``) and the resolved precision (``bf16``, ``fp32``)."""
TAG_SHARING = "mor.sharing"
TAG_ROUTER = "mor.router"
TAG_NUM_RECURSIONS = "mor.num_recursions"
TAG_KV_CACHE = "mor.kv_cache"
"""The model's MoR shape on a training run (what the dashboards group and label by)."""

# --- params ----------------------------------------------------------------------------------
PARAM_EVAL_POINTS = "points"
"""On an eval run: its depth points in evaluation order, comma-separated (router last)."""

# --- artifacts -------------------------------------------------------------------------------
ARTIFACT_ITEMS = "items.json"
"""On an eval run: {point: {task: [per-item primary score, in doc_id order]}} for every
accuracy task, what ``dashboards.stats`` bootstraps into confidence intervals."""

# --- metric keys -----------------------------------------------------------------------------
ROUTER_POINT = "router"
"""The depth point where the router chooses each token's depth; the others are fixed depths
'1'..'N_r' (the paper's test-time depth scaling, Sec. 3)."""
TOPK_POINT = "topk"
"""Expert-choice only, chosen per eval: the router's training-time top-k over the whole
sequence (the paper's tables): non-causal, so it sits beside ``ROUTER_POINT`` to show the
causality gap, never in its place."""
_EVAL = "eval/"
_POINT_KEY = re.compile(rf"^eval/d(?P<point>\d+|{ROUTER_POINT}|{TOPK_POINT})/(?P<key>.+)$")


def eval_key(key: str) -> str:
    """A headline eval metric, e.g. ``eval/average`` (a trial's own operating point)."""
    return f"{_EVAL}{key}"


def eval_point_key(point: str | int, key: str) -> str:
    """An eval metric at one depth point, e.g. ``eval/d2/nll`` or ``eval/drouter/average``."""
    return f"{_EVAL}d{point}/{key}"


def parse_eval_point_key(name: str) -> tuple[str, str] | None:
    """``eval/d<point>/<key>`` → (point, key); None for any other metric name."""
    match = _POINT_KEY.match(name)
    return (match["point"], match["key"]) if match else None


def eval_points(metrics: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """An eval run's metrics grouped per depth point: {point: {key: value}}."""
    out: dict[str, dict[str, float]] = {}
    for name, value in metrics.items():
        parsed = parse_eval_point_key(name)
        if parsed is not None:
            out.setdefault(parsed[0], {})[parsed[1]] = value
    return out


# --- a sweep's parent run: its summary metrics ---------------------------------------------
SWEEP_FINISHED = "sweep/trials_finished"
"""Trials that trained and were evaluated to the end (neither failed nor stopped early)."""
SWEEP_FAILED = "sweep/trials_failed"
SWEEP_FRONT_MODELS = "sweep/pareto_models"
"""Models (configurations, seeds pooled) on the report's Pareto front over all budgets."""


def budget_key(budget: str, key: str) -> str:
    """A parent-run metric for one training budget, e.g. ``budget/2e9/best/average``, from the
    budget as trial labels write it ('2e+09'; MLflow keys cannot hold '+')."""
    name = budget.replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")
    return f"budget/{name}/{key}"


LOWER_IS_BETTER = ("nll", "bits_per_byte", "perplexity", "loss")
"""Metric names (or their last part) where lower is better; everything else is accuracy-like."""


def higher_is_better(metric: str) -> bool:
    """Whether a larger value of ``metric`` (e.g. 'average', 'piqa/acc_norm', 'nll',
    'mor_heldout_bpb/bits_per_byte', 'lambada_openai/perplexity') is better."""
    return not metric.rsplit("/", 1)[-1].endswith(LOWER_IS_BETTER)
