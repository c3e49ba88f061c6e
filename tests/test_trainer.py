"""trainers/: DeepSpeed engines on real Ray Train workers, MLflow logging, export, resume."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from mlflow import MlflowClient
from pydantic import ValidationError

from cli.main import main as mor_main
from core.mlflow_model import local_export
from core.storage import Location
from mor.checkpoint import load_pretrained
from mor.config import build_config
from mor.flops import steps_for_budget
from mor.model import MoRModel, RoutingStats
from mor.overrides import ConfigError, validate
from trainers.components import lr_factor
from trainers.config import FaultInjection, TrainConfig, load_train_config
from trainers.data import DataConfig, prepare_data
from trainers.faults import FaultInjector
from trainers.launcher import TrainingError, plan_run, run_training
from trainers.plan import TrainPlan
from trainers.step_metrics import MicroBatchTotals, Progress, StepMeter, peak_flops
from trainers.tracking import RUN_ID_FILE

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SHAKESPEARE = SHARED / "corpus" / "tinyshakespeare" / "input.txt"
SMOLLM = SHARED / "tokenizers" / "smollm2"

needs_shared = pytest.mark.skipif(not SHAKESPEARE.is_file(), reason="../shared/data missing")


def overrides(tmp: Path, name: str, *extra: str) -> list[str]:
    return [
        f"name={name}",
        f"storage_path={tmp}",
        f"data.source={SHAKESPEARE}",
        f"data.tokenizer={SMOLLM}",
        f"data.cache_dir={tmp / 'cache'}",
        "data.seq_len=64",
        "model.preset=micro",
        "model.sharing=middle_cycle",
        "model.num_recursions=2",
        "model.router=expert_choice",
        "batch.micro_batch_size=4",
        "scaling.cpus_per_worker=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def ray_session(s3: str):
    """Ray for this module, started after the S3 server: like a cluster whose nodes hold the
    object store's credentials in their environment, its workers inherit the AWS_* variables."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=True, configure_logging=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("train")


# ------------------------------------------------------------------ config and arithmetic
@pytest.mark.parametrize(
    ("items", "field"),
    [
        (["optim.lrr=1"], "optim.lrr"),
        (["model.router=bogus"], "model.router"),
        (["model.num_recursions=3"], "model.num_layers"),
        (["budget.steps=10", "budget.tokens=100"], "budget"),
        (["optim.betas=[0.9, 1.5]"], "optim.betas"),
        (["deepspeed.zero_stage=4"], "deepspeed.zero_stage"),
        (["scaling.placement_strategy=ROUND"], "scaling.placement_strategy"),
        (["name=has space"], "name"),
        (["data.val_fraction=0.9"], "val_fraction"),
        (["tracking.experiment=../../x"], "tracking.experiment"),
        (["tracking.experiment=a/b"], "tracking.experiment"),
        (["budget.flops=inf"], "budget.flops"),
        (["budget.flops=.nan"], "budget.flops"),
        (["budget.flops=-1"], "budget.flops"),
    ],
)
def test_bad_config_names_the_field(items: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(None, items)
    assert field in str(err.value)


@pytest.mark.parametrize("field", ["name", "experiment"])
@pytest.mark.parametrize("bad", ["run\n", "../../x", "a/b", "-x", "", "x" * 101])
def test_run_and_experiment_names_are_one_safe_word(field: str, bad: str) -> None:
    data = {"name": bad} if field == "name" else {"tracking": {"experiment": bad}}
    with pytest.raises(ConfigError) as err:
        validate(TrainConfig, data)
    msg = str(err.value)
    assert ("tracking.experiment" if field == "experiment" else "name:") in msg
    assert "letters, digits" in msg
    assert validate(TrainConfig, {"name": "a.b_c-1", "tracking": {"experiment": "x" * 100}})


def test_budget_too_small_for_one_step_is_refused_up_front() -> None:
    """Refused by the config (no data, no MLflow), naming the field and the minimum."""
    with pytest.raises(ConfigError, match=r"budget\.flops: .*at least [0-9.e+]+ FLOPs"):
        load_train_config(None, ["budget.flops=1e6"])
    with pytest.raises(ConfigError, match=r"budget\.tokens: .*at least 1024 tokens"):
        load_train_config(None, ["budget.tokens=1000", "data.seq_len=128"])
    assert load_train_config(None, ["budget.tokens=1024", "data.seq_len=128"]).budget.tokens
    assert load_train_config(None, ["budget.flops=1e12"]).budget.flops == 1e12


def test_cli_reports_config_errors_without_ray(capsys: pytest.CaptureFixture) -> None:
    assert mor_main(["train", "optim.lr=-1"]) == 2
    assert "optim.lr" in capsys.readouterr().err


def test_lr_schedules() -> None:
    cfg = TrainConfig.model_validate({"optim": {"warmup_fraction": 0.1, "decay_fraction": 0.2}})
    lrs = [lr_factor(s, 100, cfg) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == 1.0  # linear warmup over 10 steps
    assert all(v == 1.0 for v in lrs[10:80])  # stable
    assert lrs[99] == pytest.approx(0.0) and lrs[89] == pytest.approx(0.5)  # last 20% decay
    cos = TrainConfig.model_validate({"optim": {"schedule": "cosine", "min_lr_ratio": 0.1}})
    assert lr_factor(100, 100, cos) == pytest.approx(0.1)
    assert lr_factor(1000, 100, cfg) == pytest.approx(0.0)  # never negative past the end


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 PCIe", 756e12),  # not the SXM figure, though the name holds "H100"
        ("NVIDIA H100 80GB HBM3", 989e12),  # the SXM part
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA GeForce GTX 1080", None),
        ("cpu", None),
    ],
)
def test_peak_flops_matches_the_most_specific_name(name: str, peak: float | None) -> None:
    assert peak_flops(name) == peak


def test_loop_router_metrics_are_routing_stats_metrics() -> None:
    """Two micro-batches of a real MoR forward, reduced and measured as the loop does."""
    mor_cfg = build_config(
        "micro", sharing="middle_cycle", num_recursions=2, router="expert_choice", vocab_size=97
    )
    torch.manual_seed(0)
    model = MoRModel(mor_cfg)
    totals, outs = MicroBatchTotals(), []
    for seed in (1, 2):
        x = torch.randint(0, 97, (3, 16), generator=torch.Generator().manual_seed(seed))
        out = model(x, labels=x)
        totals.add(out.loss, out)
        outs.append(out)
    cfg = TrainConfig.model_validate({"batch": {"micro_batch_size": 3, "grad_accum_steps": 2}})
    meter = StepMeter(cfg, mor_cfg, lambda step: 1e-3, world=1, peak=None)
    metrics = meter.measure(1, totals.reduce(torch.device("cpu"), True), 0.5, Progress())
    router = {k: v for k, v in metrics.items() if k.startswith("router/")}
    expected = RoutingStats.merge([o.stats for o in outs]).to_metrics()
    assert router.keys() == expected.keys() == outs[0].stats.to_metrics().keys()
    assert {"router/active_r2", "router/frac_depth_2", "router/mean_depth"} <= router.keys()
    assert "router/dead_frac" in router
    for k, v in expected.items():
        assert router[k] == pytest.approx(v)
    # Micro-batches: active fractions averaged, depth counts summed (token-weighted shares).
    a, b = (o.stats for o in outs)
    assert router["router/active_r2"] == pytest.approx(
        (a.active_fraction[1] + b.active_fraction[1]) / 2
    )
    counts = [x + y for x, y in zip(a.tokens_per_depth, b.tokens_per_depth, strict=True)]
    assert router["router/frac_depth_1"] == pytest.approx(counts[1] / sum(counts))
    assert router["router/mean_depth"] == pytest.approx(
        sum(d * n for d, n in enumerate(counts)) / sum(counts)
    )
    # Vanilla: no routing, no router metrics.
    vanilla = build_config("micro", sharing="none", num_recursions=1, vocab_size=97)
    out = MoRModel(vanilla)(x, labels=x)
    plain = MicroBatchTotals()
    plain.add(out.loss, out)
    red = plain.reduce(torch.device("cpu"), False)
    meter = StepMeter(cfg, vanilla, lambda step: 1e-3, world=1, peak=None)
    assert not any(k.startswith("router/") for k in meter.measure(1, red, 0.5, Progress()))


def test_fault_injector_hooks(tmp_path: Path) -> None:
    home = Location.parse(tmp_path)  # the run's persisted folder (a local one here)
    faults = FaultInjector(FaultInjection(fail_at_step=3, nan_at_step=2), home, rank=0)
    faults.before_step(2)  # not the failing step
    with pytest.raises(RuntimeError, match="fault injection"):
        faults.before_step(3)
    faults.before_step(3)  # once per run: the restarted attempt goes on
    FaultInjector(FaultInjection(fail_at_step=1), home, rank=1).before_step(1)  # rank 0 only
    loss = torch.tensor(1.5)
    assert math.isnan(float(faults.on_loss(2, loss)))
    assert float(faults.on_loss(3, loss)) == 1.5
    assert float(FaultInjector(FaultInjection(), home, 0).on_loss(2, loss)) == 1.5


@needs_shared
def test_budget_becomes_steps(workdir: Path) -> None:
    cfg = load_train_config(None, overrides(workdir, "budget", "budget.flops=2e12"))
    plan = plan_run(cfg)
    mor_cfg = cfg.mor_config(49152)
    assert plan.tokens_per_step == 4 * 64
    # The plan crosses to the workers as JSON and is validated back, unchanged.
    sent = json.loads(json.dumps(plan.model_dump(mode="json")))
    assert TrainPlan.model_validate(sent) == plan and plan.model == mor_cfg
    assert plan.meta["tracking_uri"] and plan.meta["mlflow_run_id"] == plan.run_id
    with pytest.raises(ValidationError, match="bogus"):
        TrainPlan.model_validate(sent | {"bogus": 1})
    with pytest.raises(ValidationError, match="total_steps"):
        TrainPlan.model_validate(sent | {"total_steps": "many"})
    assert plan.total_steps == steps_for_budget(mor_cfg, 2e12, 256, 64) > 0
    cfg_t = load_train_config(None, overrides(workdir, "budget-t", "budget.tokens=2560"))
    assert plan_run(cfg_t).total_steps == 10
    with pytest.raises(ConfigError, match="budget"):
        plan_run(load_train_config(None, overrides(workdir, "budget-0", "budget.tokens=10")))
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        plan_run(load_train_config(None, overrides(workdir, "v", "model.vocab_size=1000")))


# ------------------------------------------------------------------ end to end on Ray
@needs_shared
def test_two_workers_zero2_train_log_export(
    ray_session: None, workdir: Path, s3: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The corpus as a folder of parquet files (documents in rows, several row groups), put
    # through the Ray Data stage into an S3 bucket; the workers stream their shards and the
    # tokenizer from there, and the run's storage is the bucket too (Ray Train's checkpoints,
    # the run's record, the export): no disk is shared between the driver and the workers.
    parquet = shakespeare_parquet(workdir / "parquet", files=3)
    data = DataConfig(source=str(parquet), tokenizer=str(SMOLLM), seq_len=64)
    prepared = prepare_data(data, out=f"{s3}/shakespeare")
    cfg = load_train_config(
        None,
        overrides(
            workdir,
            "two-workers",
            f"data.source={prepared.dir}",
            "scaling.num_workers=2",
            "deepspeed.zero_stage=2",
            "budget.steps=12",
            "checkpoint.every_steps=6",
            "eval.every_steps=6",
            "eval.batches=2",
            f"storage_path={s3}/store",
            f"tracking.uri=sqlite:///{workdir}/mlflow.db",
        ),
    )
    result = run_training(cfg)
    _check_run_in_bucket(result, f"{s3}/store", "two-workers", workdir)
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["resolved_model.router"] == "expert_choice"
    assert run.data.params["scaling.num_workers"] == "2"
    losses = [m.value for m in client.get_metric_history(result.run_id, "train/loss")]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5  # it learns real text
    flops = [m.value for m in client.get_metric_history(result.run_id, "flops")]
    assert all(b > a for a, b in itertools.pairwise(flops))
    assert {m.step for m in client.get_metric_history(result.run_id, "val/loss")} == {6, 12}
    # The router metrics the loop logged are exactly RoutingStats.to_metrics's keys.
    export = Location.parse(result.export_dir).local_folder()  # a download of the export
    model, _ = load_pretrained(export)
    x = torch.randint(0, 100, (2, 64))
    expected = model.train()(x, labels=x).stats.to_metrics()
    assert {k for k in run.data.metrics if k.startswith("router/")} == expected.keys()
    assert {"router/frac_depth_2", "router/dead_frac", "router/active_r1"} <= expected.keys()
    # Validation measured the expert-choice drift: eval-mode routing vs training's top-k.
    drift = {k: v for k, v in run.data.metrics.items() if k.startswith("val/drift/")}
    assert drift["val/drift/capacity_r2"] == pytest.approx(model.cfg.capacity_schedule[1])
    assert 0.0 <= drift["val/drift/active_r2"] <= 1.0 and 0.0 <= drift["val/drift/agree_r2"] <= 1
    assert drift["val/drift/topk_active_r2"] == pytest.approx(
        drift["val/drift/capacity_r2"], abs=0.02
    )
    # Rank 0's node's system metrics, under MLflow's keys (the run's "System metrics" tab).
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(
        run.data.metrics
    )
    # The export is the run's MLflow model: `runs:/RUN_ID/model` gives its files back.
    (logged,) = client.search_logged_models(
        [run.info.experiment_id], f"source_run_id = '{result.run_id}'"
    )
    assert logged.name == "model" and {"val/loss", "flops"} <= {m.key for m in logged.metrics}
    monkeypatch.setenv("MOR_CACHE_DIR", str(workdir / "cache"))
    files = local_export(f"runs:/{result.run_id}/model", result.tracking_uri)
    assert {"config.json", "model.pt", "tokenizer.json"} <= {f.name for f in files.iterdir()}

    # The export loads in a fresh process without Ray or DeepSpeed and reproduces val loss.
    script = f"""
import json, sys, torch
from mor.checkpoint import load_pretrained
from trainers.windows import TokenWindows
from trainers.components import validation_metrics
model, meta = load_pretrained({str(export)!r})
path = sys.argv[1]  # an s3:// URI: never a Path
losses = [validation_metrics(model, TokenWindows(path, "val", 64, r, 2), 4, 2, torch.device("cpu"))
          ["val/loss"] for r in range(2)]
print(json.dumps({{"val": sum(losses) / 2, "deepspeed": "deepspeed" in sys.modules,
                  "ray": "ray" in sys.modules, "step": meta["step"]}}))
"""
    data_dir = plan_data_dir(cfg)
    out = subprocess.run(
        [sys.executable, "-c", script, data_dir], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step"] == 12 and not got["deepspeed"] and not got["ray"]
    assert math.isclose(got["val"], result.metrics["val/loss"], rel_tol=1e-5)


def shakespeare_parquet(folder: Path, files: int) -> Path:
    """TinyShakespeare's documents as ``files`` parquet files of 64-row row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from trainers.sources import split_text

    docs = split_text(SHAKESPEARE.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        table = pa.table({"text": docs[i::files], "id": list(range(len(docs)))[i::files]})
        pq.write_table(table, folder / f"part-{i:05d}.parquet", row_group_size=64)
    return folder


def _check_run_in_bucket(result: Any, store: str, name: str, workdir: Path) -> None:
    """Ray Train's checkpoints, the run's record and its export are objects in the bucket;
    nothing of the run is on local disk."""
    bucket = Location.parse(store)
    assert result.export_dir == f"{store}/runs/{name}/export"
    assert {"config.json", "model.pt", "tokenizer.json"} <= set(
        Location.parse(result.export_dir).names()
    )
    assert any(n.startswith("checkpoint_") for n in bucket.child("ray", name).names())
    assert bucket.child("runs", name, RUN_ID_FILE).read_json()["run_id"] == result.run_id
    assert not (workdir / "ray" / name).exists() and not (workdir / "runs" / name).exists()


def plan_data_dir(cfg: TrainConfig) -> str:
    from trainers.data import prepare_data

    return str(prepare_data(cfg.data).dir)


@needs_shared
def test_rerun_resumes_from_latest_checkpoint(ray_session: None, workdir: Path) -> None:
    items = overrides(
        workdir,
        "resume",
        "budget.steps=6",
        "checkpoint.every_steps=3",
        "eval.every_steps=3",
        "fault_injection.fail_at_step=5",
        "deepspeed.zero_stage=3",  # ZeRO-3: partitioned params, gathered for the export
    )
    cfg = load_train_config(None, items)
    with pytest.raises(TrainingError):
        run_training(cfg)
    plan = plan_run(cfg)
    client = MlflowClient(plan.tracking_uri)
    assert plan.resumed_run
    assert [m.step for m in client.get_metric_history(plan.run_id, "train/loss")] == [1, 2, 3, 4]
    result = run_training(cfg, plan=plan)
    assert result.run_id == plan.run_id
    steps = [m.step for m in client.get_metric_history(plan.run_id, "train/loss")]
    assert steps == [1, 2, 3, 4, 5, 6]  # no gaps, no repeats
    run = client.get_run(plan.run_id)
    assert run.data.tags["mor.resumed_from_step"] == "3"  # step 4 was redone, not logged twice
    assert run.info.status == "FINISHED"
    meta = json.loads((Path(result.export_dir) / "config.json").read_text())["meta"]
    assert meta["step"] == 6
    # What `mor eval EXPORT` needs to log beside its training run, with no flags.
    assert meta["mlflow_run_id"] == result.run_id and meta["tracking_uri"] == result.tracking_uri
