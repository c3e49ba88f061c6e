"""sweeps/search.py for real: random and Optuna (TPE) searches on tiny sweeps, ASHA on
training FLOPs, and an Optuna + ASHA sweep resumed after its driver was SIGKILLed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import yaml
from conftest import TINY_BASE, _free_port, start_mlflow, stop
from mlflow import MlflowClient
from test_sweeps import _kill_tagged, spec_dict

from cli.main import main as mor_main
from core.storage import Location, local_mirror
from mor.overrides import validate
from sweeps.driver import run_sweep
from sweeps.spec import SweepSpec

# ------------------------------------------------------------------ searchers, for real
# sharing none | cycle | middle_cycle; N_r and the router drawn only for a recursive model;
# N_r=3 fits cycle's 6 layers but not middle-cycle's 4 middle ones: an invalid combination.
SEARCH_SPACE = {
    "model.sharing": {"choice": ["none", "cycle", "middle_cycle"]},
    "model.num_recursions": {
        "choice": [2, 3],
        "when": {"model.sharing": ["cycle", "middle_cycle"]},
    },
    "model.router": {
        "choice": ["expert_choice", "token_choice"],
        "when": {"model.sharing": ["cycle", "middle_cycle"]},
    },
    "optim.lr": {"loguniform": [1e-3, 1e-2]},
}
SEARCH_BASE = {**TINY_BASE, "model": {**TINY_BASE["model"], "sharing": "none", "num_recursions": 1}}


def search_spec(tmp: Path, name: str, **extra: object) -> dict:
    return spec_dict(tmp, name, base=SEARCH_BASE, variants=[], space=SEARCH_SPACE, **extra)


def _check_draws(tracking_uri: str, parent_run_id: str, state_dir: Path) -> list:
    """Every trial's config respects the conditions and is valid; skips carry a reason."""
    client = MlflowClient(tracking_uri)
    exp = client.get_run(parent_run_id).info.experiment_id
    trains = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent_run_id}'")
    for t in trains:
        p = {k: t.data.tags[f"mor.{k}"] for k in ("sharing", "router", "num_recursions")}
        if p["sharing"] == "none":  # no router, N_r 1: the conditional axes were not drawn
            assert (p["router"], p["num_recursions"]) == ("none", "1"), p
        else:
            assert p["router"] in ("expert_choice", "token_choice")
        assert (p["sharing"], p["num_recursions"]) != ("middle_cycle", "3")
    skipped = [json.loads(x) for x in (state_dir / "skipped.jsonl").read_text().splitlines()]
    assert skipped and all("divisible by num_recursions=3" in s["reason"] for s in skipped)
    parent = client.get_run(parent_run_id)
    assert parent.data.tags["mor.skipped"] == str(len(skipped))
    return trains


def test_random_search_end_to_end(tmp_path: Path) -> None:
    """Random search on a real (tiny) sweep: conditional draws (vanilla gets no router),
    invalid draws skipped before any trial starts (with the reason), max_concurrent and the
    sweep's FLOPs cap (3 trials wanted, 2 fit), the best trial in the summary, on the parent
    run and in results.md."""
    import ray

    data = search_spec(
        tmp_path,
        "rnd",
        searcher="random",
        num_samples=3,
        budgets=[5e8],
        max_total_flops=1.2e9,
        metric="val/loss",
        mode="min",
        resources={"max_concurrent": 2},
        eval={"enabled": False},
    )
    data["space"] = {  # this order makes seed 0 draw vanilla and invalid combinations
        **SEARCH_SPACE,
        "model.sharing": {"choice": ["none", "middle_cycle", "cycle"]},
    }
    ray.init(address="local", num_cpus=2, configure_logging=False)
    try:
        res = run_sweep(validate(SweepSpec, data))
    finally:
        ray.shutdown()
    assert not res.errors and len(res.rows) == 2  # the cap: a 3rd 5e8 trial would pass 1.2e9
    state = tmp_path / "sweeps" / "rnd"
    trains = _check_draws(res.tracking_uri, res.parent_run_id, state)
    assert len(trains) == 2 and all(t.info.status == "FINISHED" for t in trains)
    assert any(t.data.tags["mor.sharing"] == "none" for t in trains)
    out = res.outcome
    assert out["train_flops_spent"] <= 1.2e9 and out["max_concurrent"] == 2
    best = out["best"]
    losses = [r["val/loss"] for r in res.rows]
    assert best["value"] == min(losses) and best["metric"] == "val/loss"
    assert set(best["config"]) <= set(SEARCH_SPACE) and "model.sharing" in best["config"]
    parent = MlflowClient(res.tracking_uri).get_run(res.parent_run_id)
    assert parent.data.tags["mor.best_label"] == best["label"]
    assert parent.data.tags["mor.best.model.sharing"] == best["config"]["model.sharing"]
    assert parent.data.metrics["best/val/loss"] == pytest.approx(best["value"])
    results_md = (state / "report" / "results.md").read_text()
    assert results_md.startswith("**Best trial of rnd:") and "val/loss" in results_md.split("\n")[0]


def _first_finished_training(client: MlflowClient, proc: subprocess.Popen, log: Path) -> str:
    """Wait until the sweep's first trial finished training; its run id."""
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.time() < deadline, log.read_text()[-3000:]
        time.sleep(1)
        if "proposed:" not in log.read_text():  # the driver has not set up MLflow yet: a
            continue  # second process creating the sqlite tables at once can break both
        try:
            exp = client.get_experiment_by_name("sweeps-test")
            done = client.search_runs(
                [exp.experiment_id],
                "tags.`mor.sharing` != '' and attributes.status = 'FINISHED'",
            )
        except Exception:
            continue
        if done:
            return done[0].info.run_id


def _validated_at_milestones(trial_dir: Location, milestones: list[float]) -> int:
    """Tune got a validation loss at the first step past every rung the trial reached (a trial
    restarted by the resume reports from where it was: its earlier rungs are not checked)."""
    results = [json.loads(x) for x in trial_dir.child("result.json").read_text().splitlines()]
    results = [r for r in results if "flops" in r and "step" in r]
    per_step = results[-1]["flops"] / results[-1]["step"]
    checked = 0
    for m in milestones:
        if results[-1]["flops"] < m or results[0]["flops"] - per_step * 1.01 >= m:
            continue
        at = [r for r in results if m <= r["flops"] < m + per_step * 1.01]
        assert at and "val/loss" in at[0], (trial_dir.uri, m, at[:1])
        checked += 1
    return checked


@pytest.mark.extended  # ~3 min (local) and ~4.5 min (s3): python -m pytest -q tests -m extended
@pytest.mark.parametrize("where", ["local", "s3"])
def test_optuna_asha_sweep_resumes_after_driver_sigkill(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
    where: str,
) -> None:
    """Optuna (TPE) + ASHA on FLOPs, driver SIGKILLed after the first trial: `mor sweep resume`
    continues the same search (the proposal count goes on, the finished trial is neither
    re-proposed nor retrained, 3 trials in all); ASHA's rungs are FLOPs milestones where
    every trial reports a validation loss; a stopped trial is a tagged, partial point.

    ``s3``: everything the sweep persists is in an S3 bucket
    (moto's server): Tune's experiment, the trials' checkpoints and exports, prepared data, the
    sweep's record, its bookkeeping (ASHA's rungs and stops), summary and report; the MLflow
    server stores its artifacts there too, and the finished trials are evaluated from their
    exports there. The resumed driver starts with an empty local cache, as on another
    machine."""
    monkeypatch.setenv("MOR_CACHE_DIR", str(tmp_path / "cache"))  # this machine's own files
    if where == "local":
        _optuna_asha(tmp_path, capsys, str(tmp_path), f"sqlite:///{tmp_path / 'mlflow.db'}", None)
        return
    s3 = request.getfixturevalue("s3")
    mlflow_port = _free_port()
    server = start_mlflow(mlflow_port, tmp_path, artifacts=f"{s3}/mlflow")
    try:
        _optuna_asha(tmp_path, capsys, f"{s3}/opt-store", f"http://127.0.0.1:{mlflow_port}", s3)
    finally:
        stop(server)


def _optuna_asha(
    tmp_path: Path, capsys: pytest.CaptureFixture, store: str, uri: str, s3: str | None
) -> None:
    data = search_spec(
        tmp_path,
        "opt",
        searcher="optuna",
        num_samples=3,
        budgets=[1e9],
        scheduler={"grace_flops": 2.5e8, "reduction_factor": 2},
        metric="val/loss",
        mode="min",
        resources={"max_concurrent": 1},
        eval={"limit": 4, "tasks": ["mor_heldout_mc"]} if s3 else {"enabled": False},
        storage_path=store,
        tracking={"experiment": "sweeps-test", "uri": uri},
    )
    data["space"] = {
        **SEARCH_SPACE,
        "model.sharing": {"choice": ["cycle", "middle_cycle", "none"]},
    }
    path = tmp_path / "opt.yaml"
    path.write_text(yaml.safe_dump(data))
    client = MlflowClient(uri)
    first, steps_before = _run_and_kill_after_first_trial(tmp_path, path, client)
    if s3:  # resumed from a machine that never ran the sweep: only the bucket knows it
        assert Location.parse(store).child("sweeps", "opt", "state", "asha_rungs.json").is_file()
        shutil.rmtree(tmp_path / "cache")
    assert mor_main(["sweep", "resume", "opt", "--storage-path", store]) == 0
    after = capsys.readouterr().out
    # The search went on where its last saved state was: no new first proposal, 3 in all.
    assert "trial 1/3 proposed" not in after and "trial 3/3 proposed" in after
    assert len(client.get_metric_history(first, "train/loss")) == steps_before  # not retrained
    _check_resumed_search(client, store, s3)
    if s3:  # nothing on local disk but caches
        assert not any((tmp_path / d).exists() for d in ("tune", "runs", "sweeps", "outputs"))


def _run_and_kill_after_first_trial(
    tmp_path: Path, path: Path, client: MlflowClient
) -> tuple[str, int]:
    """`mor sweep run` in its own process, SIGKILLed (with its local Ray) once its first trial
    finished training; (that trial's run id, its logged steps)."""
    tag = f"optuna-resume-{os.getpid()}-{time.time()}"
    env = {**os.environ, "MOR_TEST_TAG": tag, "MOR_STACK_DIR": str(tmp_path / "no-stack")}
    for var in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(var, None)
    log = tmp_path / "driver.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "sweep", "run", str(path)],
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        first = _first_finished_training(client, proc, log)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        _kill_tagged(tag)  # the driver's own local Ray, and nothing else
    assert "search (optuna): trial 1/3 proposed" in log.read_text()
    return first, len(client.get_metric_history(first, "train/loss"))


def _check_resumed_search(client: MlflowClient, store: str, s3: str | None) -> None:
    """3 distinct trials in all, none left RUNNING; ASHA validated at its FLOPs rungs and
    stopped at least one (a tagged, partial point); the best is the best finished trial."""
    state = local_mirror(store) / "sweeps" / "opt"  # the driver's own bookkeeping
    home = Location.parse(store).child("sweeps", "opt")  # what the sweep published
    outcome = home.child("summary.json").read_json()
    parent = client.search_runs([client.get_experiment_by_name("sweeps-test").experiment_id],
                                "tags.`mor.kind` = 'sweep'")  # fmt: skip
    trains = _check_draws(client.tracking_uri, parent[0].info.run_id, state)
    # A trial proposed just before the kill, after Tune's last saved state, is proposed again
    # on resume; a run it had begun is marked interrupted, not counted.
    trains = [t for t in trains if "mor.interrupted" not in t.data.tags]
    assert len(trains) == 3 and outcome["trials"] == 3  # num_samples respected
    configs = {(t.data.tags["mor.label"], t.data.params["optim.lr"]) for t in trains}
    assert len(configs) == 3  # nothing proposed twice
    exp_id = client.get_experiment_by_name("sweeps-test").experiment_id
    assert not client.search_runs([exp_id], "attributes.status = 'RUNNING'")  # none left
    milestones = [2.5e8, 5e8]
    experiment = Location.parse(store).child("tune", "opt")
    trial_dirs = [experiment.child(n) for n in experiment.names()]
    trial_dirs = [d for d in trial_dirs if d.child("result.json").is_file()]  # not Tune's state
    assert len(trial_dirs) >= 3 and all("_1e9_" in d.uri for d in trial_dirs)  # named by point
    checked = sum(_validated_at_milestones(d, milestones) for d in trial_dirs)
    assert checked >= 2, experiment.names()
    rungs = json.loads((state / "asha_rungs.json").read_text())  # [[FLOPs, {trial: -loss}]]
    assert set(milestones) <= {m for m, recorded in rungs if recorded}
    stopped = [t for t in trains if "mor.stopped_early" in t.data.tags]
    assert len(stopped) == len(outcome["stopped_early"]) >= 1
    results_md = home.child("report", "results.md").read_text()
    if s3:
        _check_stored_on_s3(client, trains, stopped, store, s3)
    for t in trains:
        if t in stopped:
            assert t.info.status == "KILLED"
            assert float(t.data.tags["mor.stopped_early"]) in milestones
            assert outcome["best"]["train_run_id"] != t.info.run_id
        else:
            assert t.info.status == "FINISHED"
    assert results_md.count("(partial)") == len(stopped)
    assert outcome["best"]["value"] == min(
        t.data.metrics["val/loss"] for t in trains if t not in stopped
    )


def _check_stored_on_s3(
    client: MlflowClient, trains: list, stopped: list, store: str, s3: str
) -> None:
    """Each finished trial was evaluated from its export in the bucket, and MLflow's artifacts
    (exports, evaluations, the sweep's summary and report) are objects in the bucket too."""
    finished = [t for t in trains if t not in stopped]
    for t in finished:
        name = t.data.params["name"]
        assert Location.parse(store).child("runs", name, "export", "config.json").is_file()
        assert t.data.tags["mor.export_dir"] == f"{store}/runs/{name}/export"
        assert client.get_run(t.data.tags["mor.eval_run_id"]).info.status == "FINISHED"
    mlflow_root = Location.parse(f"{s3}/mlflow")
    selector = pafs.FileSelector(mlflow_root.path, recursive=True)
    objects = [i.path for i in mlflow_root.fs.get_file_info(selector)]
    # Each finished trial's export is a logged MLflow model, its files in the bucket (MLflow 3:
    # <experiment>/models/<model id>/...). A trial ASHA stopped may have one too.
    exports = [p for p in objects if "/models/m-" in p and p.endswith("/export/config.json")]
    for t in finished:
        ids = {o.model_id for o in t.outputs.model_outputs}
        assert any(f"/models/{i}/" in p for i in ids for p in exports), (ids, exports)
    assert any(p.endswith("/summary.csv") for p in objects)
    assert any(p.endswith("/results.md") for p in objects)
