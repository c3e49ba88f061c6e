"""Compute-vs-accuracy: evaluate one model at every test-time depth with lm-eval.

For a model with N_r recursions the points are: depth d = 1..N_r (every token runs exactly d
recursions, ``force_depth``) and ``router`` (the router's own causal choice, when the model has
a router). Each point records the measured inference FLOPs per token (from the routing the
model actually did on the evaluated text, ``mor/flops.py``), every task's metrics with standard
errors, the average accuracy, the held-out NLL, and each accuracy task's per-item scores (for
the bootstrap intervals of ``dashboards.stats``).
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from core.keys import ROUTER_POINT, TOPK_POINT
from core.quiet import verbose
from evals.default_tasks import bpb_docs, heldout_documents, prepare_default_tasks
from evals.lm_backend import MoRLM
from evals.routing_analysis import analyse_routing
from mor.checkpoint import load_pretrained, tokenizer_file
from mor.flops import forward_flops_per_token
from mor.model import MoRModel

PAPER_TASKS = ("lambada_openai", "hellaswag", "piqa", "winogrande", "arc_easy", "arc_challenge")
PRIMARY = ("acc_norm", "acc")  # the paper reports acc_norm for HellaSwag, PIQA, ARC
BPB = "bits_per_byte"
NLL_DOCS = 12


@dataclass
class DepthPoint:
    label: str  # "1".."N_r" (forced depth) or "router"
    depth: int | None
    mean_depth: float
    tokens_per_depth: list[int]
    active_fractions: list[float] | None
    flops_per_token: float  # exact forward FLOPs per token, measured routing
    flops_per_token_paper: float
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    average: float | None = None  # mean primary accuracy over the accuracy tasks
    nll: float | None = None  # mean next-token NLL on held-out default-corpus text
    items: dict[str, list[Any]] = field(default_factory=dict)
    """Per accuracy task, each item's primary score (acc_norm, else acc) in doc_id order:
    what ``dashboards.stats`` resamples. Perplexity-type tasks have none."""


@dataclass
class EvalReport:
    model: str
    tasks: list[str]
    limit: int | None
    num_recursions: int
    points: list[DepthPoint]
    meta: dict[str, Any] = field(default_factory=dict)
    routing: dict[str, Any] | None = None
    """``RoutingAnalysis.to_dict()`` on held-out text (routed models): drift and depth vs
    difficulty and token frequency."""
    system_metrics: list[Any] = field(default_factory=list, repr=False)
    """The system metrics sampled while it ran (``mlflow.entities.Metric``,
    ``core.system_metrics``), logged with the eval run once it exists."""

    def to_dict(self) -> dict[str, Any]:
        """Everything but the per-item scores (``items_dict``; items.json) and the system
        metrics (MLflow's): results.json and ``mor eval --json`` stay one screen per point
        whatever the task sizes."""
        out = asdict(self)
        out.pop("system_metrics")
        for point in out["points"]:
            point.pop("items", None)
        return out

    def items_dict(self) -> dict[str, dict[str, list[float]]]:
        """Per point label, per accuracy task, the per-item scores in doc_id order."""
        return {p.label: p.items for p in self.points}

    def rows(self) -> list[dict[str, Any]]:
        """One flat row per (point, task, metric), for CSV/pandas."""
        out = []
        for p in self.points:
            base = {
                "point": p.label,
                "depth": p.depth,
                "mean_depth": p.mean_depth,
                "flops_per_token": p.flops_per_token,
                "flops_per_token_paper": p.flops_per_token_paper,
                "average": p.average,
                "nll": p.nll,
            }
            for task, metrics in p.metrics.items():
                for name, value in metrics.items():
                    if not name.endswith("_stderr"):
                        out.append(
                            {
                                **base,
                                "task": task,
                                "metric": name,
                                "value": value,
                                "stderr": metrics.get(f"{name}_stderr"),
                            }
                        )
        return out


def depth_points(
    model: MoRModel, depths: list[str] | None = None, topk: bool = False
) -> list[tuple[str, int | None]]:
    """(label, forced depth) per point: ``depths`` as given (validated), else every depth and
    the router's; ``topk`` adds the non-causal top-k point to an expert-choice model's."""
    points = _listed_points(model, depths) if depths else _default_points(model)
    if topk and model.cfg.router == "expert_choice" and TOPK_POINT not in dict(points):
        points.append((TOPK_POINT, None))
    return points


def _default_points(model: MoRModel) -> list[tuple[str, int | None]]:
    points: list[tuple[str, int | None]] = [
        (str(d), d) for d in range(1, model.cfg.num_recursions + 1)
    ]
    if model.cfg.router != "none":
        points.append((ROUTER_POINT, None))
    return points


def _listed_points(model: MoRModel, depths: list[str]) -> list[tuple[str, int | None]]:
    n_r = model.cfg.num_recursions
    out: list[tuple[str, int | None]] = []
    for d in map(str, depths):
        if d == TOPK_POINT and model.cfg.router != "expert_choice":
            raise ValueError(f"depths: {TOPK_POINT!r} needs an expert-choice model")
        if d in (ROUTER_POINT, TOPK_POINT):
            out.append((d, None))
        elif not d.isdigit() or not 1 <= int(d) <= n_r:
            allowed = f"1..{n_r}, {ROUTER_POINT!r} or {TOPK_POINT!r}"
            raise ValueError(f"depths: {d!r} is not a depth point of this model; use {allowed}")
        else:
            out.append((str(int(d)), int(d)))
    return out


def build_task_manager(tasks: list[str], data_dir: str | Path | None, work_dir: Path) -> Any:
    """Local YAMLs: the default tasks, plus the paper's tasks read from ``data_dir``. lm-eval's
    own ~14,000 built-in task YAMLs are indexed only when a task is none of those: the index
    costs ~16 s per process, more than evaluating the quickstart's tasks at limit 4."""
    from lm_eval.tasks import TaskManager

    include = [str(prepare_default_tasks(work_dir / "default_tasks"))]
    from evals.tasks import TASK_NAMES, prepare_tasks

    wanted = [t for t in tasks if t in TASK_NAMES]
    if wanted and data_dir is not None:
        include.append(str(prepare_tasks(data_dir, work_dir / "paper_tasks", wanted)))
    ours = TaskManager(include_path=include, include_defaults=False)
    if all(t in ours.all_tasks for t in tasks):
        return ours
    return TaskManager(include_path=include)


def heldout_nll(lm: MoRLM, docs: int = NLL_DOCS) -> float:
    """Mean next-token NLL over held-out default-corpus text: lm-eval's public
    ``loglikelihood_rolling`` (whole documents, rolling max_length windows) per token."""
    from lm_eval.api.instance import Instance

    texts = [d["text"] for d in bpb_docs(heldout_documents())[:docs]]
    requests = [
        Instance(request_type="loglikelihood_rolling", doc={}, arguments=(text,), idx=i)
        for i, text in enumerate(texts)
    ]
    total = sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
    count = sum(len(lm.tok_encode(text)) for text in texts)
    return -total / max(1, count)


def _task_metrics(results: dict[str, Any], task: str) -> dict[str, float]:
    raw = results["results"].get(task, {})
    out = {}
    for key, value in raw.items():
        if not isinstance(value, (int, float)) or key in ("alias", "sample_len"):
            continue
        name = key.split(",")[0]  # lm-eval keys look like "acc,none"
        if isinstance(value, float) and math.isnan(value):
            continue
        out[name] = float(value)
    return out


def task_items(results: dict[str, Any], task: str) -> list[Any]:
    """One task's per-item scores from lm-eval's logged samples, sorted by doc_id: the
    primary accuracy of each item, or for a bits-per-byte task each document's
    [loglikelihood, bytes] (its weighted aggregate is resampled as a ratio,
    ``dashboards.stats.bpb_ci``); empty for other tasks."""
    samples = (results.get("samples") or {}).get(task) or []
    if not samples:
        return []
    first_filter = samples[0].get("filter")
    scored = []
    for sample in samples:
        if sample.get("filter") != first_filter:
            continue
        key = next((k for k in (*PRIMARY, BPB) if k in sample), None)
        value = sample.get(key) if key else None
        if key == BPB and isinstance(value, (list, tuple)) and len(value) == 2:
            value = [float(value[0]), float(value[1])]
        elif isinstance(value, (bool, int, float)):
            value = float(value)
        else:
            return []
        scored.append((sample["doc_id"], value))
    return [v for _, v in sorted(scored, key=lambda s: s[0])]


def load_tasks(tasks: list[str], data_dir: str | Path | None, work: Path) -> tuple[Any, list]:
    """(task manager, what ``simple_evaluate`` takes): the tasks are built, and their datasets
    read, once for all depth points; an unknown task is a clear error."""
    from lm_eval.api.task import Task
    from lm_eval.tasks import get_task_dict

    manager = build_task_manager(tasks, data_dir, work)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        hint = "" if data_dir else " (the paper's tasks need --data-dir offline)"
        raise ValueError(f"tasks: unknown task(s) {unknown}{hint}")
    built = get_task_dict(list(tasks), manager)
    if all(isinstance(t, Task) for t in built.values()):
        return manager, list(built.values())
    return manager, list(tasks)


def evaluate_model(
    model_ref: str | Path | MoRModel,
    tasks: list[str],
    data_dir: str | Path | None = None,
    depths: list[str] | None = None,
    topk: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    work_dir: str | Path | None = None,
    tokenizer: str | Path | None = None,
    num_fewshot: int | None = None,
    nll_docs: int = NLL_DOCS,
    eos_id: int | None = None,
    title: str | None = None,
) -> EvalReport:
    """Evaluate ``model_ref`` (an export folder or a model) at every test-time depth.

    ``eos_id`` defaults to the export's recorded one; an in-memory model needs it given.
    ``title`` names the model in the console's one line per point (default: its name).
    """
    if isinstance(model_ref, MoRModel):
        model, meta, name = model_ref.eval(), {}, "in-memory"
    else:
        model, meta = load_pretrained(model_ref, device=device)
        tokenizer = tokenizer or tokenizer_file(model_ref)
        name = str(model_ref)
    eos_id = eos_id if eos_id is not None else meta.get("eos_id")
    if tokenizer is None:
        raise ValueError("tokenizer: the model has no tokenizer.json; pass --tokenizer")
    work = Path(work_dir or Path.home() / ".cache" / "mor-platform" / "eval_tasks")
    manager, task_args = load_tasks(tasks, data_dir, work)
    points = []
    todo = depth_points(model, depths, topk)
    for i, (label, depth) in enumerate(todo, 1):
        what = point_title(label, depth, model.cfg.num_recursions)
        # stderr, like a progress bar: `mor eval --json` keeps stdout for the report
        print(f"[mor] eval {title or name}: {what} (point {i}/{len(todo)})", file=sys.stderr)
        lm = MoRLM(
            model=model,
            tokenizer=str(tokenizer),
            depth=depth,
            device=device,
            batch_size=batch_size,
            eos_id=eos_id,
            routing="topk" if label == TOPK_POINT else "causal",
            progress=verbose(),
        )
        metrics, items = score_tasks(lm, tasks, task_args, manager, limit, num_fewshot)
        nll = heldout_nll(lm, nll_docs) if nll_docs > 0 else None
        points.append(depth_point(model, lm, label, depth, metrics, nll))
        points[-1].items = items
    report = EvalReport(name, list(tasks), limit, model.cfg.num_recursions, points, meta)
    # Windows as long as training's: positions past them were never trained (nor routed).
    seq_len = int(meta.get("seq_len") or model.cfg.max_seq_len)
    analysis = analyse_routing(model, lm.tokenizer, lm.eot_token_id, seq_len=seq_len)
    report.routing = analysis.to_dict() if analysis is not None else None
    return report


def point_title(label: str, depth: int | None, num_recursions: int) -> str:
    """What one point of the curve is, for people: 'depth 2/3', "router's choice"."""
    if depth is not None:
        return f"depth {depth}/{num_recursions}"
    return "router's choice" if label == ROUTER_POINT else "top-k routing (non-causal)"


@contextmanager
def lm_eval_environment() -> Iterator[None]:
    """lm-eval records the environment in every result, once per ``simple_evaluate`` (one
    per depth point), with no option to skip it: ``git describe`` of the working directory
    (outside a git checkout, e.g. a Tune trial's folder, git prints ``fatal: not a git
    repository`` on the console) and ``add_env_info`` (torch's ``collect_env``: subprocesses,
    ~2 s). The same calls here, git's stderr kept off the console and the environment
    collected once per process."""
    import lm_eval.evaluator as evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    evaluator.get_git_commit_hash = _git_hash
    evaluator.add_env_info = _env_info_once
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved


def _git_hash() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always"], capture_output=True, text=True, timeout=10,
            check=False,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


_ENV_INFO: dict[str, Any] = {}


def _env_info_once(storage: dict[str, Any]) -> None:
    import copy

    from lm_eval.loggers.utils import add_env_info

    if not _ENV_INFO:
        add_env_info(_ENV_INFO)
    storage.update(copy.deepcopy(_ENV_INFO))


def score_tasks(
    lm: MoRLM,
    tasks: list[str],
    task_args: list,
    manager: Any,
    limit: int | None,
    num_fewshot: int | None,
) -> tuple[dict[str, dict[str, float]], dict[str, list[Any]]]:
    """One lm-eval pass at one depth point: (per task metrics, per task item scores:
    accuracies, or [loglikelihood, bytes] per document for bits per byte). The logged
    samples hold every document: they end with this call."""
    import lm_eval

    torch.manual_seed(0)
    with lm_eval_environment():
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=task_args,
            task_manager=manager,
            limit=limit,
            num_fewshot=num_fewshot,
            bootstrap_iters=100,
            log_samples=True,  # per-item scores for the bootstrap; bounded by limit x tasks
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
            fewshot_random_seed=0,
        )
    metrics = {t: _task_metrics(results, t) for t in tasks}
    return metrics, {t: v for t in tasks if (v := task_items(results, t))}


def depth_point(
    model: MoRModel,
    lm: MoRLM,
    label: str,
    depth: int | None,
    metrics: dict[str, dict[str, float]],
    nll: float | None,
) -> DepthPoint:
    """One point of the curve: the routing ``lm`` measured, its FLOPs, and the task scores."""
    fractions = lm.tally.active_fractions()
    seq = max(1, round(lm.tally.mean_seq_len())) if lm.tally.sequences else None
    exact = forward_flops_per_token(model.cfg, seq, fractions, max_depth=depth).total
    paper = forward_flops_per_token(
        model.cfg, seq, fractions, max_depth=depth, convention="paper"
    ).total
    per_depth = lm.tally.per_depth or [0] * (model.cfg.num_recursions + 1)
    mean_depth = (
        sum(d * c for d, c in enumerate(per_depth)) / sum(per_depth)
        if sum(per_depth)
        else float(depth or model.cfg.num_recursions)
    )
    accs = [
        next(m[k] for k in PRIMARY if k in m)
        for m in metrics.values()
        if any(k in m for k in PRIMARY)
    ]
    return DepthPoint(
        label=label,
        depth=depth,
        mean_depth=mean_depth,
        tokens_per_depth=list(per_depth),
        active_fractions=fractions,
        flops_per_token=exact,
        flops_per_token_paper=paper,
        metrics=metrics,
        average=sum(accs) / len(accs) if accs else None,
        nll=nll,
    )
