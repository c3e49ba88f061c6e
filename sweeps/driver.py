"""Run a sweep with Ray Tune: one function trainable per trial drives that trial's TorchTrainer.

Ray Train V2 pattern: the Tune trial is a light driver (it reserves almost no CPU) that starts
a ``TorchTrainer``; training metrics flow back to Tune through ``TuneReportCallback``. After
training, the trial's exported model is evaluated at every test-time depth (``evals``) and the
final metrics are reported. MLflow: one parent run per sweep; every trial's training run is its
child, and each evaluation a child of that.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from core.keys import (
    KIND_SWEEP,
    PARAM_EVAL_POINTS,
    TAG_EVAL_RUN_ID,
    TAG_KIND,
    eval_key,
    eval_point_key,
    eval_points,
)
from core.quiet import honour_lost_sigterm
from mor.overrides import ConfigError
from sweeps.plan import (
    SweepPlan,
    TrialPoint,
    plan_sweep,
    trial_config,
    trial_title,
    with_sampled,
)
from sweeps.space import sample_defaults
from sweeps.spec import POINT, SweepSpec
from sweeps.store import SweepStore
from sweeps.summary import log_parent_metrics, parent_metrics, search_outcome
from trainers.data import prepare_data
from trainers.launcher import ResourceError, check_resources
from trainers.tracking import connect, find_or_create_run, flatten, mark_interrupted_run
from trainers.writer_lock import acquire, release

# The per-trial driver only waits on its TorchTrainer: it reserves no CPU (a fractional CPU
# would leave e.g. 1.98 of 2 CPUs, and a second trial's 1-CPU worker would never start), only
# a little memory, because a Tune trial needs a non-empty resource request.
TRIAL_RESOURCES = {"cpu": 0, "memory": 256 * 2**20}
SPEC_FILE = "spec.json"


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    summary_csv: Path
    rows: list[dict[str, Any]]
    errors: list[str]
    artifacts: list[Path] = field(default_factory=list)
    outcome: dict[str, Any] = field(default_factory=dict)
    """``summary.json``: best trial, early stops, skipped draws, FLOPs spent (search_outcome)."""


def tracking_uri_for(spec: SweepSpec) -> str:
    """The sweep's MLflow URI (``core.endpoints``: spec, env, the `mor up` stack, sqlite)."""
    from core.endpoints import resolve_tracking_uri

    return resolve_tracking_uri(spec.tracking.uri, spec.resolved_storage_path)


def sweep_store(spec: SweepSpec) -> SweepStore:
    return SweepStore.of(spec.resolved_storage_path, spec.name)


# The headline eval metrics a trial reports, per depth point and for its own operating point.
_TRIAL_EVAL_KEYS = ("average", "flops_per_token", "nll")
# The training metrics a trial reports at its end (Tune's last result, the summary table).
_TRIAL_TRAIN_KEYS = ("val/loss", "train/loss", "flops", "tokens", "step")


def trial_fn(
    config: dict[str, Any], spec_dict: dict[str, Any], parent_run_id: str, tracking_uri: str
) -> None:
    """One Tune trial: train (Ray Train workers), evaluate at every depth, report.

    Tune's param_space becomes typed here, at the trial boundary: the spec and the grid point
    are validated back into ``SweepSpec`` and ``TrialPoint``, and the trial's ``TrainConfig``
    is built once, validated, by ``trial_config``.
    """
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from trainers.launcher import run_training

    honour_lost_sigterm()  # the actor's teardown SIGTERM exits even inside a weakref callback
    spec = SweepSpec.model_validate(spec_dict)
    point = TrialPoint.model_validate(config[POINT])
    sampled = {k: v for k, v in config.items() if k != POINT}
    cfg = trial_config(
        spec,
        point,
        sampled,
        name=f"{spec.name}-{tune.get_context().get_trial_id()}",
        parent_run_id=parent_run_id,
        tracking_uri=tracking_uri,
    )
    # lock=False: trials run under their sweep's writer lock (taken by its driver).
    result = run_training(cfg, callbacks=[TuneReportCallback()], lock=False)
    final: dict[str, Any] = {k: v for k, v in result.metrics.items() if k in _TRIAL_TRAIN_KEYS}
    final["train_run_id"] = result.run_id
    final["label"] = with_sampled(point.label, sampled)
    if spec.eval.enabled:
        eval_run_id, points = _evaluate(spec, result, tracking_uri, trial_title(final["label"]))
        final["eval_run_id"] = eval_run_id
        for label, values in points.items():
            final.update({eval_point_key(label, k): v for k, v in values.items()})
        # The last point: the router's choice, or full depth without a router.
        final.update({eval_key(k): v for k, v in list(points.values())[-1].items()})
    tune.report({k: v for k, v in final.items() if v is not None})


def _evaluate(
    spec: SweepSpec, result: Any, tracking_uri: str, title: str
) -> tuple[str, dict[str, dict[str, float | None]]]:
    """(eval run id, {point: {key: value}}) of the trained model, in evaluation order.

    A trial resumed after its evaluation was logged (driver killed before Tune heard of it)
    reuses that evaluation: one eval run per trained model, never a duplicate.
    """
    from evals.pipeline import run_eval

    done = finished_eval(tracking_uri, result.run_id, spec.headline)
    if done is not None:
        return done
    report, eval_run_id, _ = run_eval(
        result.export_dir,
        spec.eval.tasks,
        data_dir=spec.eval.data_dir,
        depths=spec.eval.depths,
        topk=spec.eval.topk,
        limit=spec.eval.limit,
        batch_size=spec.eval.batch_size,
        tracking_uri=tracking_uri,
        parent_run_id=result.run_id,
        work_dir=sweep_store(spec).eval_work_dir,
        title=title,
    )
    points = {}
    for p in report.points:
        values = {"average": p.average, "flops_per_token": p.flops_per_token, "nll": p.nll}
        if "/" in spec.headline:  # TASK/METRIC: the sweep's ranking needs it per trial
            task, metric = spec.headline.split("/", 1)
            values[spec.headline] = p.metrics.get(task, {}).get(metric)
        points[p.label] = values
    return eval_run_id, points


def finished_eval(
    tracking_uri: str, train_run_id: str, headline: str = "average"
) -> tuple[str, dict[str, dict[str, float | None]]] | None:
    """(eval run id, {point: {key: value}}) of a finished evaluation, if any, in evaluation
    order, with the keys a trial reports (``_TRIAL_EVAL_KEYS`` and the headline)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    eval_id = client.get_run(train_run_id).data.tags.get(TAG_EVAL_RUN_ID)
    if not eval_id:
        return None
    run = client.get_run(eval_id)
    if run.info.status != "FINISHED":
        return None
    logged = eval_points(run.data.metrics)
    order = [p for p in run.data.params.get(PARAM_EVAL_POINTS, "").split(",") if p]
    keys = (*_TRIAL_EVAL_KEYS, *([headline] if "/" in headline else []))
    points = {p: {k: logged.get(p, {}).get(k) for k in keys} for p in order}
    return (eval_id, points) if points else None


def _searcher_and_space(
    plan: SweepPlan, state_dir: Path, max_concurrent: int
) -> tuple[Any, dict, int]:
    """(search algorithm, param_space, num_samples). Grid: Tune's grid over the points, which
    travel as plain dicts stored with the experiment (for resume); ``trial_fn`` validates them
    back. Random and optuna: the guarded Optuna searcher of sweeps/search.py, which owns the
    space (draws, conditional axes, validation, the FLOPs cap)."""
    from ray import tune

    spec = plan.spec
    if spec.searcher == "grid":
        points = [p.model_dump(mode="json") for p in plan.points]
        return None, {POINT: tune.grid_search(points)}, 1
    from sweeps.search import make_searcher, trial_count_of

    search = make_searcher(spec, list(plan.points), state_dir, max_concurrent)
    return search, {}, trial_count_of(spec, len(plan.points))


def max_concurrent_trials(spec: SweepSpec) -> int:
    import ray

    if spec.resources.max_concurrent:
        return spec.resources.max_concurrent
    res = ray.cluster_resources()
    per_trial_cpu = spec.resources.num_workers * spec.resources.cpus_per_worker
    fits = math.floor(res.get("CPU", 1) / per_trial_cpu + 1e-9)
    if spec.resources.gpus_per_worker > 0:
        per_trial_gpu = spec.resources.num_workers * spec.resources.gpus_per_worker
        fits = min(fits, math.floor(res.get("GPU", 0) / per_trial_gpu + 1e-9))
    if fits < 1:
        raise ConfigError(
            f"resources: a trial needs {per_trial_cpu} CPUs"
            f"{' and GPUs' if spec.resources.gpus_per_worker else ''}; "
            f"the cluster has {dict(res)}"
        )
    return fits


def run_sweep(
    plan: SweepPlan | SweepSpec, resume: bool = False, address: str | None = None
) -> SweepResult:
    """Run (or, with resume=True, continue) a sweep to the end and summarise it.

    Give the ``SweepPlan`` the caller already made (``plan_sweep``); a raw spec is planned here.
    """
    import ray

    if isinstance(plan, SweepSpec):
        plan = plan_sweep(plan)
    started_ray = not ray.is_initialized()
    state_dir = sweep_store(plan.spec).state_dir
    acquire(state_dir, f"sweep {plan.spec.name!r}")  # one driver per sweep name
    try:
        return _run_sweep(plan, resume, address)
    finally:
        release(state_dir)
        if started_ray and ray.is_initialized():  # a Ray this call started, not the caller's
            ray.shutdown()


def _run_sweep(plan: SweepPlan, resume: bool, address: str | None) -> SweepResult:
    import ray
    from ray import tune

    from core.quiet import verbose

    spec = plan.spec  # its storage path is absolute: Tune runs each trial in its own folder
    for msg in plan.dropped:
        print(f"[mor] skipped invalid {msg}")
    uri = tracking_uri_for(spec)
    client, exp_id = connect(uri, spec.tracking.experiment)
    store = sweep_store(spec)
    state_dir = store.state_dir
    parent_run_id, _ = find_or_create_run(
        client,
        exp_id,
        spec.name,
        store.home,
        flatten(spec.model_dump(mode="json")),
        tags={TAG_KIND: KIND_SWEEP},
    )
    state_dir.mkdir(parents=True, exist_ok=True)
    if not resume:
        store.home.child(SPEC_FILE).write_text(spec.model_dump_json(indent=2))
    if not ray.is_initialized():  # the stack's head when it is up, with its token auth
        from core.endpoints import resolve_endpoints
        from core.quiet import ray_init_kwargs

        target = resolve_endpoints(ray_address=address).ray_address
        ray.init(address=target, **ray_init_kwargs(target))
    res = spec.resources
    try:  # a trial that can never be placed would make Tune wait forever
        check_resources(
            res.num_workers, res.cpus_per_worker, res.gpus_per_worker, 0, "resources",
            res.placement_strategy,
        )  # fmt: skip
    except ResourceError:
        client.set_terminated(parent_run_id, status="FAILED")
        raise
    prepare_sweep_data(plan)
    # Tune's intermediate results come from training; the searcher's metric arrives at the end.
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_fn,
            spec_dict=spec.model_dump(mode="json"),
            parent_run_id=parent_run_id,
            tracking_uri=uri,
        ),
        TRIAL_RESOURCES,
    )
    if resume:
        store.restore()  # the killed driver's bookkeeping, wherever it ran
        for run_id in mark_interrupted(client, parent_run_id):
            print(f"[mor] marked interrupted run {run_id} as KILLED")
        if not tune.Tuner.can_restore(store.experiment):
            raise ConfigError(f"name: no sweep {spec.name!r} to resume under {store.tune_storage}")
        tuner = tune.Tuner.restore(store.experiment, trainable=trainable, resume_errored=True)
    else:
        tuner = _new_tuner(plan, trainable, store, (uri, parent_run_id))
    if not verbose():  # Tune's legacy output path: the only one taking our reporter
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    grid = tuner.fit()
    return summarise(spec, grid, client, parent_run_id, uri, state_dir)


def prepare_sweep_data(plan: SweepPlan) -> None:
    """Prepare each distinct training corpus once, here, before any trial starts: the Ray Data
    stage then has the cluster's CPUs (a trial's are taken), and trials find it ready."""
    seen: set[str] = set()
    for point in plan.points:
        sampled = sample_defaults(plan.spec, point)
        data = trial_config(plan.spec, point, sampled, name="data").data
        key = data.model_dump_json()
        if key not in seen:
            seen.add(key)
            prepare_data(data)


def _new_tuner(
    plan: SweepPlan, trainable: Any, store: SweepStore, tracking: tuple[str, str]
) -> Any:
    """A fresh Tuner: the spec's searcher, its ASHA scheduler on cumulative training FLOPs (if
    any) and its concurrency. The searcher and the scheduler carry their own metrics (the
    spec's ``metric`` and the scheduler's ``val/loss``), so Tune is given none."""
    from ray import tune

    from core.quiet import tune_verbosity, verbose
    from sweeps.progress import SweepTable, trial_dirname, trial_name
    from sweeps.search import RUNGS_FILE, SKIPPED_FILE, STOPPED_FILE, PlacementGroupJanitor

    spec, state_dir = plan.spec, store.state_dir
    for stale in (SKIPPED_FILE, STOPPED_FILE, RUNGS_FILE):  # a new search starts clean
        (state_dir / stale).unlink(missing_ok=True)
    store.forget()
    concurrent = max_concurrent_trials(spec)
    search_alg, space, num_samples = _searcher_and_space(plan, state_dir, concurrent)
    scheduler = None
    if spec.scheduler is not None:
        from sweeps.search import FlopsASHA

        scheduler = FlopsASHA(spec, state_dir, tracking)
    rungs = ", ".join(f"{m:.3g}" for m in scheduler.milestones) if scheduler else ""
    trials = num_samples if search_alg else len(plan.points) * num_samples
    print(
        f"[mor] sweep {spec.name!r}: searcher {spec.searcher}, {trials} trial(s) "
        f"{'at most ' if search_alg else ''}(grid points × samples), max_concurrent "
        f"{concurrent}"
        + (f", max_total_flops {spec.max_total_flops:.3g}" if spec.max_total_flops else "")
        + (f", ASHA rungs at {rungs} FLOPs" if rungs else "")
    )
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(
            search_alg=search_alg,
            scheduler=scheduler,
            num_samples=num_samples,
            max_concurrent_trials=concurrent,
            trial_name_creator=trial_name,  # 'mor-ec-middle-cycle-3 @ 2e12'
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=spec.name,
            storage_path=store.tune_storage,
            callbacks=[PlacementGroupJanitor()],
            verbose=tune_verbosity(),
            progress_reporter=None if verbose() else SweepTable(spec.metric),
        ),
    )


def mark_interrupted(client: Any, parent_run_id: str) -> list[str]:
    """Runs of this sweep left RUNNING by a killed driver (evaluations cut short, trials that
    died) become KILLED with a tag saying so; resumed trials reopen their own training run."""
    exp_id = client.get_run(parent_run_id).info.experiment_id
    trains = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    marked = []
    for run in trains:
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{run.info.run_id}'")
        for r in [run, *children]:
            if r.info.status == "RUNNING":
                mark_interrupted_run(client, r.info.run_id)
                marked.append(r.info.run_id)
    return marked


def error_reason(text: str) -> str:
    """The useful line of a trial's error (ours, not Ray's wrapper), at most 300 characters."""
    match = re.search(r"TrainingError: (.+)", text)
    if match:
        return match.group(1).strip()[:300]
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def summarise(
    spec: SweepSpec, grid: Any, client: Any, parent_run_id: str, uri: str, state_dir: Path
) -> SweepResult:
    """One row per trial (config + final metrics) → CSV on disk and on the parent run."""
    import pandas as pd

    rows, errors = [], []
    for res in grid:
        cfg = res.config or {}
        row: dict[str, Any] = {
            "trial": Path(res.path).name if res.path else None,
            "label": with_sampled(
                (cfg.get(POINT) or {}).get("label") or "",
                {k: v for k, v in cfg.items() if k != POINT},
            ),
        }
        row.update({k: v for k, v in cfg.items() if k != POINT})
        row["budget"] = (cfg.get(POINT) or {}).get("budget")
        metrics = res.metrics or {}
        row.update(
            {
                k: v
                for k, v in metrics.items()
                if isinstance(v, (int, float, str))
                and not k.startswith(("config/", "time_", "timestamp"))
            }
        )
        if res.error:
            row["error"] = error_reason(str(res.error))
            errors.append(f"{row['label']}: {row['error']}")
        rows.append(row)
    state_dir.mkdir(parents=True, exist_ok=True)
    outcome = search_outcome(spec, rows, state_dir, uri, parent_run_id)
    csv = state_dir / "summary.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    client.log_artifact(parent_run_id, str(csv))
    artifacts: list[Path] = []
    fronts: tuple[dict[str, int], int | None] = ({}, None)
    try:  # the Pareto plots and results table, attached to the parent run
        from dashboards.report import build_report

        report = build_report(uri, [spec.name], state_dir / "report", metric=spec.headline)
        artifacts = [f for f in report.files if f.suffix in (".png", ".svg", ".html", ".md")]
        on_front = int(report.front["replicate_of"].nunique()) if not report.front.empty else 0
        fronts = (report.front_models, on_front)
    except Exception as exc:  # a report problem must not lose the sweep's results
        print(f"[mor] report not built: {exc}")
    log_parent_metrics(client, parent_run_id, parent_metrics(spec.headline, rows, *fronts))
    mark_interrupted(client, parent_run_id)  # e.g. an evaluation cut short by a failed trial
    sweep_store(spec).publish([csv, state_dir / "summary.json", *artifacts])
    client.set_terminated(parent_run_id, status="FAILED" if errors else "FINISHED")
    return SweepResult(spec.name, parent_run_id, uri, csv, rows, errors, artifacts, outcome)


def load_saved_spec(name: str, storage_path: str = "outputs") -> SweepSpec:
    """The spec a sweep was started with (for `mor sweep resume NAME`), from its record in
    the storage path (a folder or an object-store URI)."""
    home = SweepStore.of(storage_path, name).home
    path = home.child(SPEC_FILE)
    if not path.is_file():
        where = home.uri.rsplit("/", 1)[0]
        raise ConfigError(f"name: no sweep {name!r} under {where} (no {SPEC_FILE})")
    return SweepSpec.model_validate_json(path.read_text())
