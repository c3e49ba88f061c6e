"""trainers/: DeepSpeed engines on real Ray Train workers, MLflow logging, export, resume."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from cli.main import main as mor_main
from mor.flops import steps_for_budget
from mor.overrides import ConfigError
from trainers.config import TrainConfig, load_train_config
from trainers.launcher import TrainingError, plan_run, run_training
from trainers.loop import lr_factor

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
def ray_session():
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
        (["name=has space"], "name"),
        (["data.val_fraction=0.9"], "val_fraction"),
    ],
)
def test_bad_config_names_the_field(items: list[str], field: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_train_config(None, items)
    assert field in str(err.value)


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


@needs_shared
def test_budget_becomes_steps(workdir: Path) -> None:
    cfg = load_train_config(None, overrides(workdir, "budget", "budget.flops=2e12"))
    plan = plan_run(cfg)
    mor_cfg = cfg.mor_config(49152)
    assert plan.tokens_per_step == 4 * 64
    assert plan.total_steps == steps_for_budget(mor_cfg, 2e12, 256, 64) > 0
    cfg_t = load_train_config(None, overrides(workdir, "budget-t", "budget.tokens=2560"))
    assert plan_run(cfg_t).total_steps == 10
    with pytest.raises(ConfigError, match="budget"):
        plan_run(load_train_config(None, overrides(workdir, "budget-0", "budget.tokens=10")))
    with pytest.raises(ConfigError, match=r"model\.vocab_size"):
        plan_run(load_train_config(None, overrides(workdir, "v", "model.vocab_size=1000")))


# ------------------------------------------------------------------ end to end on Ray
@needs_shared
def test_two_workers_zero2_train_log_export(ray_session: None, workdir: Path) -> None:
    cfg = load_train_config(
        None,
        overrides(
            workdir,
            "two-workers",
            "scaling.num_workers=2",
            "deepspeed.zero_stage=2",
            "budget.steps=12",
            "checkpoint.every_steps=6",
            "eval.every_steps=6",
            "eval.batches=2",
        ),
    )
    result = run_training(cfg)
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
    assert "router/frac_depth_2" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(result.run_id, "model")}
    assert {"model/config.json", "model/model.pt", "model/tokenizer.json"} <= artifacts

    # The export loads in a fresh process without Ray or DeepSpeed and reproduces val loss.
    script = f"""
import json, sys, torch
from pathlib import Path
from mor.checkpoint import load_pretrained
from trainers.data import PackedDataset
from trainers.loop import validation_loss
model, meta = load_pretrained({str(result.export_dir)!r})
path = Path(sys.argv[1])
losses = [validation_loss(model, PackedDataset(path, 64, r, 2), 4, 2, torch.device("cpu"))
          for r in range(2)]
print(json.dumps({{"val": sum(losses) / 2, "deepspeed": "deepspeed" in sys.modules,
                  "ray": "ray" in sys.modules, "step": meta["step"]}}))
"""
    val_path = plan_val_path(cfg)
    out = subprocess.run(
        [sys.executable, "-c", script, val_path], capture_output=True, text=True, check=True
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["step"] == 12 and not got["deepspeed"] and not got["ray"]
    assert math.isclose(got["val"], result.metrics["val/loss"], rel_tol=1e-5)


def plan_val_path(cfg: TrainConfig) -> str:
    from trainers.data import prepare_data

    return str(prepare_data(cfg.data).val_path)


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
    assert json.loads((result.export_dir / "config.json").read_text())["meta"]["step"] == 6
