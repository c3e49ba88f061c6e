"""Driver side of a training run: validate, plan, start Ray Train, export, log to MLflow.

Everything that can be checked is checked before Ray starts: the config, the data (prepared and
cached here, once), the model/tokenizer vocabulary, the budget, and that MLflow answers.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.endpoints import check_ray_reachable, resolve_endpoints, strip_credentials
from core.keys import (
    TAG_EXPORT_DIR,
    TAG_FAILURE,
    TAG_KV_CACHE,
    TAG_NUM_RECURSIONS,
    TAG_ROUTER,
    TAG_SHARING,
)
from core.mlflow_model import log_export_model
from core.quiet import ray_init_kwargs, ray_train_log_level
from core.storage import Location
from mor.flops import steps_for_budget, training_flops_per_token
from mor.overrides import ConfigError
from trainers.checkpointing import tidy_run_dir
from trainers.config import TrainConfig, default_tracking_uri
from trainers.data import prepare_data
from trainers.plan import TrainPlan
from trainers.ray_trainer import start_autoscaling_coordinator
from trainers.run_log import SPOOL_FILE
from trainers.run_store import RunStore, save_export
from trainers.tracking import (
    connect,
    find_or_create_run,
    flatten,
    mark_killed_writers,
    sync_spool,
)
from trainers.writer_lock import acquire, release

# Bytes per parameter of one checkpoint: fp32 weights, AdamW's two moments, bf16/fp32 master
# copies (a rough upper bound for ZeRO 0-3 on one node).
CHECKPOINT_BYTES_PER_PARAM = 16


class TrainingError(RuntimeError):
    """The training run failed on the cluster; the message says why."""


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    export_dir: str
    """The exported model: a local folder, or a folder URI on object storage."""
    metrics: dict[str, float]
    total_steps: int


def parameter_counts(mor_cfg: Any) -> dict[str, int]:
    """Unique parameters (shared layers once), counted on the meta device: no memory used."""
    import torch

    from mor.model import MoRModel

    with torch.device("meta"):
        return MoRModel(mor_cfg).num_parameters()


def plan_run(cfg: TrainConfig, world_size: int | None = None, lock: bool = True) -> TrainPlan:
    """Validate and prepare everything that does not need Ray (data, budget, MLflow run).

    ``lock``: take the run's writer lock (released by ``run_training``); a sweep's trials run
    under their sweep's lock instead."""
    store = RunStore.of(cfg)
    check_storage(store.storage)  # seconds, before the data stage may start Ray
    default_tracking_uri(cfg)  # an object store without a tracking server: refused here
    prepared = prepare_data(cfg.data, address=cfg.address)
    mor_cfg = cfg.mor_config(prepared.vocab_size)
    world = world_size or cfg.scaling.num_workers
    seq = cfg.data.seq_len
    tokens_per_step = cfg.batch.micro_batch_size * cfg.batch.grad_accum_steps * world * seq
    total = _total_steps(cfg, mor_cfg, tokens_per_step)
    _check_shards(cfg, prepared, world)
    need = parameter_counts(mor_cfg)["total"] * CHECKPOINT_BYTES_PER_PARAM
    check_free_space(store.storage, need * (cfg.checkpoint.keep + 1))
    if lock:
        acquire(store.local_dir, f"run {cfg.name!r}")
    try:
        return _plan_tracking(cfg, mor_cfg, prepared, total, tokens_per_step)
    except BaseException:
        release(store.local_dir)
        raise


def _plan_tracking(
    cfg: TrainConfig, mor_cfg: Any, prepared: Any, total: int, tokens_per_step: int
) -> TrainPlan:
    """The MLflow run (found or created) and the plan around it."""
    seq = cfg.data.seq_len
    uri = default_tracking_uri(cfg)
    client, exp_id = connect(uri, cfg.tracking.experiment)
    store = RunStore.of(cfg)
    for run_id in mark_killed_writers(client, store.local_dir.parent):
        print(f"[mor] run {run_id} was left RUNNING by a killed process: marked KILLED")
    params = flatten(cfg.model_dump(mode="json"))
    params.update(flatten(mor_cfg.model_dump(mode="json"), "resolved_model."))
    for key, value in parameter_counts(mor_cfg).items():
        params[f"model.params_{key}"] = str(value)
    params["plan.total_steps"] = str(total)
    params["plan.tokens_per_step"] = str(tokens_per_step)
    run_id, resumed = find_or_create_run(
        client,
        exp_id,
        cfg.name,
        store.home,
        params,
        parent_run_id=cfg.tracking.parent_run_id,
        tags={
            TAG_SHARING: mor_cfg.sharing,
            TAG_ROUTER: mor_cfg.router,
            TAG_NUM_RECURSIONS: str(mor_cfg.num_recursions),
            TAG_KV_CACHE: mor_cfg.kv_cache,
            **cfg.tracking.tags,
        },
    )
    return TrainPlan(
        model=mor_cfg,
        total_steps=total,
        tokens_per_step=tokens_per_step,
        data=prepared.folders(),
        tokenizer_path=str(prepared.tokenizer_path),
        tracking_uri=uri,
        experiment_id=exp_id,
        run_id=run_id,
        resumed_run=resumed,
        state_dir=store.home.uri,
        meta={
            "run_name": cfg.name,
            "mlflow_run_id": run_id,
            "tracking_uri": strip_credentials(uri),
            "seq_len": seq,
            "eos_id": prepared.eos_id,
            "flops_convention": cfg.budget.convention,
        },
    )


def check_storage(root: Location) -> None:
    """The storage path takes a file; else a clear error in seconds (a read-only disk gave
    ~100 s of Ray retries and a RUNNING run; a missing bucket or wrong credentials, Ray's
    retries and a traceback)."""
    try:
        root.check_writable()
    except OSError as exc:
        first = (str(exc.strerror or exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"storage_path: {root} is not writable: {first[:300]}") from None


def check_free_space(root: Location, need_bytes: int) -> None:
    """A local storage path has room for the run's checkpoints (an object store has no
    free-space figure to check)."""
    if not root.is_local:
        return
    free = shutil.disk_usage(root.path).free
    if free < need_bytes:
        raise ConfigError(
            f"storage_path: {root} has {free / 2**20:.0f} MiB free; this run's checkpoints need "
            f"about {need_bytes / 2**20:.0f} MiB (checkpoint.keep + 1 of them): free space, "
            "lower checkpoint.keep or choose another storage_path"
        )


def _total_steps(cfg: TrainConfig, mor_cfg: Any, tokens_per_step: int) -> int:
    """The budget (steps, tokens or FLOPs) as optimizer steps at the global batch."""
    b, seq = cfg.budget, cfg.data.seq_len
    if b.steps is not None:
        total = b.steps
    elif b.tokens is not None:
        total = b.tokens // tokens_per_step
    else:
        total = steps_for_budget(mor_cfg, b.flops, tokens_per_step, seq, convention=b.convention)
    if total < 1:  # TrainConfig refuses most such budgets; this check knows the tokenizer
        if b.tokens is not None:
            field, need = "budget.tokens", f"{tokens_per_step} tokens"
        else:
            per_token = training_flops_per_token(mor_cfg, seq, convention=b.convention)
            field, need = "budget.flops", f"{per_token * tokens_per_step:.3g} FLOPs"
        raise ConfigError(
            f"{field}: pays for no optimizer step; one step needs at least {need}; raise the "
            "budget or lower batch.micro_batch_size / grad_accum_steps"
        )
    return total


def _check_shards(cfg: TrainConfig, prepared: Any, world: int) -> None:
    """Every worker's share holds a micro-batch of training and a held-out sequence."""
    seq = cfg.data.seq_len
    share = prepared.windows("train", seq) // world
    if share < cfg.batch.micro_batch_size:
        raise ConfigError(
            f"data: each of {world} workers gets {share} training sequences of "
            f"{seq} tokens, fewer than batch.micro_batch_size={cfg.batch.micro_batch_size}"
        )
    if prepared.windows("val", seq) // world < 1:
        raise ConfigError("data.val_fraction: the held-out split is too small for one sequence")


def run_training(
    cfg: TrainConfig,
    callbacks: list[Any] | None = None,
    plan: TrainPlan | None = None,
    lock: bool = True,
) -> TrainResult:
    """Train one configuration on Ray Train workers; resumes a run of the same name.

    One writer per run name: the writer lock (``plan_run``) is released at the end."""
    plan = plan or plan_run(cfg, lock=lock)
    try:
        return _run_training(cfg, callbacks, plan)
    finally:  # the lock plan_run took (a no-op when this process does not hold it)
        release(RunStore.of(cfg).local_dir)


def _run_training(cfg: TrainConfig, callbacks: list[Any] | None, plan: TrainPlan) -> TrainResult:
    import ray

    started_ray = not ray.is_initialized()
    if started_ray:  # a command-line run; inside a Tune trial Ray is already up
        # Also turns on Ray token auth when the cluster is an existing one (the `mor up`
        # stack's head requires it).
        address = resolve_endpoints(ray_address=cfg.address).ray_address
        try:
            check_ray_reachable(address)
            ray.init(address=address, **ray_init_kwargs(address))
        except Exception as exc:  # the run exists in MLflow: it must not stay RUNNING
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            reason = f"could not start or connect to Ray at {address!r}: {first}"
            if "InvalidAuthToken" in str(exc.__cause__):  # Ray hides the cause in a traceback
                reason += " (the cluster wants a Ray auth token: RAY_AUTH_MODE=token)"
            record_failure(plan, reason)
            raise TrainingError(f"training run {cfg.name!r} failed: {reason}") from exc
    try:
        return _fit(cfg, plan, callbacks)
    finally:
        if started_ray:
            ray.shutdown()


def _fit(cfg: TrainConfig, plan: TrainPlan, callbacks: list[Any] | None) -> TrainResult:
    import ray
    from mlflow import MlflowClient

    use_gpu = cfg.scaling.use_gpu
    if use_gpu == "auto":
        use_gpu = ray.cluster_resources().get("GPU", 0) >= 1
    sc = cfg.scaling
    try:  # Ray would wait forever for workers that can never be placed
        check_resources(
            sc.num_workers, sc.cpus_per_worker, float(bool(use_gpu)), sc.resource_wait_s,
            placement_strategy=sc.placement_strategy,
        )  # fmt: skip
    except ResourceError as exc:
        record_failure(plan, str(exc))
        raise
    # The plan is frozen: a validated copy carries the settled GPU choice to the workers.
    plan = TrainPlan.model_validate(plan.model_dump() | {"use_gpu": bool(use_gpu)})
    store = RunStore.of(cfg)
    tidy_run_dir(store.ray_run_dir, cfg.checkpoint.keep)  # torn Ray state, `keep` on restart
    start_autoscaling_coordinator()  # before Ray Train's 5-s call to it (trainers.ray_trainer)
    trainer = _trainer(cfg, plan, callbacks)
    spool = store.home.child(SPOOL_FILE)
    try:
        result = trainer.fit()
    except Exception as exc:
        reason = str(exc)
        if "diverged" in reason:
            reason = "training diverged: " + reason.split("training diverged:", 1)[1][:500]
        record_failure(plan, reason, spool)
        raise TrainingError(f"training run {cfg.name!r} failed: {reason}") from exc
    finally:  # Ray deletes only the checkpoints it knows of: `keep` bounds the others too
        tidy_run_dir(store.ray_run_dir, cfg.checkpoint.keep)
    sync_spool(plan.tracking_uri, plan.run_id, spool)
    if result.checkpoint is None:
        raise TrainingError(f"training run {cfg.name!r} finished without a checkpoint")
    try:
        export = save_export(result.checkpoint, store)
    except FileNotFoundError:
        raise TrainingError(f"the final checkpoint of {cfg.name!r} holds no export") from None
    client = MlflowClient(tracking_uri=plan.tracking_uri)
    # The export as an MLflow model ("Logged models", registrable, `mor eval runs:/ID/model`),
    # with the run's last metrics. MLflow uploads from a local folder into its own store.
    log_export_model(plan.tracking_uri, plan.run_id, export.local_folder(), plan.total_steps)
    client.set_tag(plan.run_id, TAG_EXPORT_DIR, export.uri)
    client.set_terminated(plan.run_id, status="FINISHED")
    metrics = {
        k: float(v) for k, v in (result.metrics or {}).items() if isinstance(v, (int, float))
    }
    return TrainResult(plan.run_id, plan.tracking_uri, export.uri, metrics, plan.total_steps)


def _trainer(cfg: TrainConfig, plan: TrainPlan, callbacks: list[Any] | None) -> Any:
    """The Ray Train TorchTrainer; the plan crosses to the workers as JSON (TrainPlan)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig

    from trainers.loop import train_loop_per_worker
    from trainers.ray_trainer import torch_trainer_class

    return torch_trainer_class()(
        train_loop_per_worker,
        train_loop_config={
            "train": cfg.model_dump(mode="json"),
            "plan": plan.model_dump(mode="json"),
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=RunStore.of(cfg).ray_storage,
            failure_config=FailureConfig(max_failures=cfg.checkpoint.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep),
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level=ray_train_log_level()),
        ),
    )


class ResourceError(ValueError):
    """The Ray cluster cannot hold the requested workers (a user error: exit 2)."""


def check_resources(
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    wait_s: float = 0.0,
    field: str = "scaling",
    placement_strategy: str = "PACK",
) -> None:
    """Fail in seconds, naming what is missing, when the cluster cannot place the workers:
    too few CPUs or GPUs in total, no node with one worker's share, or (STRICT_SPREAD) fewer
    alive nodes with a worker's share than workers (Ray's own start-up retries without
    bound). ``wait_s`` > 0 polls that long for an autoscaling cluster; ``field`` is the
    config section the message names."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        nodes = ray.nodes()
        missing = _missing_resources(num_workers, cpus_per_worker, gpus_per_worker, nodes)
        spread = placement_strategy == "STRICT_SPREAD"
        if spread and not missing:
            missing = _missing_nodes(num_workers, cpus_per_worker, gpus_per_worker, nodes)
        if not missing:
            return
        if time.monotonic() >= deadline:
            gpu = f" + {gpus_per_worker:g} GPU" if gpus_per_worker else ""
            hint = f"lower {field}.num_workers or {field}.cpus_per_worker"
            if spread:
                hint = f"add nodes, lower {field}.num_workers or set {field}.placement_strategy"
                hint += " to SPREAD or PACK"
            if field == "scaling":
                hint += ", or give scaling.resource_wait_s for an autoscaling cluster"
            where = f"{field}.placement_strategy=STRICT_SPREAD: " if spread else f"{field}: "
            raise ResourceError(
                f"{where}{num_workers} worker(s) × {cpus_per_worker:g} CPU{gpu} cannot be "
                f"placed: {'; '.join(missing)}; {hint}"
            )
        time.sleep(min(5.0, max(0.1, deadline - time.monotonic())))


def _missing_resources(
    num_workers: int, cpus: float, gpus: float, nodes: list[dict[str, Any]]
) -> list[str]:
    alive = [n.get("Resources", {}) for n in nodes if n.get("Alive")]
    missing = []
    for name, per_worker in (("CPU", cpus), ("GPU", gpus)):
        if per_worker <= 0:
            continue
        have = [r.get(name, 0.0) for r in alive]
        if sum(have) < num_workers * per_worker:
            missing.append(
                f"the cluster has {sum(have):g} {name}s, the run needs {num_workers * per_worker:g}"
            )
        elif max(have, default=0.0) < per_worker:
            missing.append(f"no node has {per_worker:g} {name}s for one worker")
    return missing


def _missing_nodes(
    num_workers: int, cpus: float, gpus: float, nodes: list[dict[str, Any]]
) -> list[str]:
    """STRICT_SPREAD: one worker per node, so as many alive nodes with a worker's share."""
    fit = [
        n
        for n in nodes
        if n.get("Alive")
        and n.get("Resources", {}).get("CPU", 0.0) >= cpus
        and n.get("Resources", {}).get("GPU", 0.0) >= gpus
    ]
    if len(fit) >= num_workers:
        return []
    alive = sum(1 for n in nodes if n.get("Alive"))
    return [
        f"each worker needs its own node and {len(fit)} of the cluster's {alive} alive "
        f"node(s) can hold one"
    ]


def record_failure(plan: TrainPlan, reason: str, spool: Path | None = None) -> None:
    """Mark the MLflow run FAILED with its reason (metrics spooled so far are sent first).

    A failure to log is printed, never raised: the caller raises the training error itself.
    """
    from mlflow import MlflowClient

    try:
        if spool is not None:
            sync_spool(plan.tracking_uri, plan.run_id, spool)
        client = MlflowClient(tracking_uri=plan.tracking_uri)
        if client.get_run(plan.run_id).info.status == "FINISHED":  # a rerun of a finished run
            print(f"[mor] rerun failed ({reason[:300]}); the finished run stays FINISHED")
            return
        client.set_tag(plan.run_id, TAG_FAILURE, reason[:5000])
        client.set_terminated(plan.run_id, status="FAILED")
    except Exception as log_exc:
        print(f"[mor] could not record the failure in MLflow: {log_exc}")
