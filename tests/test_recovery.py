"""Recoverable state without a cluster: checkpoint manifests, Ray's torn checkpoint record,
one writer per run or sweep name, killed writers' runs, storage checks, the sqlite store.

The training-run halves of these (a tampered or lost checkpoint on resume) are in
test_reliability.py, on its Ray session.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_reliability import items
from test_trainer import needs_shared

from mor.overrides import ConfigError, validate
from sweeps.plan import plan_sweep
from sweeps.spec import SweepSpec
from trainers.config import load_train_config
from trainers.launcher import plan_run


def test_torn_ray_checkpoint_record_is_set_aside(tmp_path: Path) -> None:
    """A torn ``checkpoint_manager_snapshot.json`` made Ray's controller fail (a 144-line
    traceback, the run unrecoverable): it is set aside before Ray starts, and folders beyond
    ``keep`` go."""
    from trainers.checkpointing import SNAPSHOT, tidy_run_dir

    for i in range(4):
        (tmp_path / f"checkpoint_2026-01-0{i + 1}").mkdir()
    (tmp_path / SNAPSHOT).write_text('{"checkpoint_results": [{"checkpoint_dir_name": "chec')
    tidy_run_dir(tmp_path, keep=2)
    assert not (tmp_path / SNAPSHOT).exists() and any(tmp_path.glob(f"{SNAPSHOT}.unusable-*"))
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*") if p.is_dir()) == [
        "checkpoint_2026-01-03",
        "checkpoint_2026-01-04",
    ]


def test_checkpoint_manifest_names_the_offending_file(tmp_path: Path) -> None:
    from trainers.checkpointing import CheckpointIntegrityError, verify_manifest, write_manifest

    (tmp_path / "step1").mkdir()
    (tmp_path / "step1" / "a.pt").write_bytes(b"weights")
    (tmp_path / "latest").write_text("step1")
    with pytest.raises(CheckpointIntegrityError, match="no mor_manifest"):
        verify_manifest(tmp_path)
    write_manifest(tmp_path, rank=0)
    verify_manifest(tmp_path)  # intact
    (tmp_path / "step1" / "a.pt").write_bytes(b"weightz")
    with pytest.raises(CheckpointIntegrityError, match=r"step1/a\.pt: does not match its SHA"):
        verify_manifest(tmp_path)
    (tmp_path / "step1" / "a.pt").write_bytes(b"weights")
    (tmp_path / "step1" / "evil.pt").write_bytes(b"x")
    with pytest.raises(CheckpointIntegrityError, match=r"evil\.pt: not in the checkpoint"):
        verify_manifest(tmp_path)


# ------------------------------------------------------------------ one writer, storage
@needs_shared
def test_one_writer_per_name_and_killed_writers_marked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A live second writer of a run or sweep name is refused, naming the holder; once the
    holder is dead its lock is stale: the runs it left RUNNING are marked interrupted
    (KILLED), and the name can be written again (its run reopened, no longer marked). A
    storage path that cannot be written, or is too full for the checkpoints, fails in seconds
    before any MLflow run exists."""
    from conftest import tiny_spec_dict

    from sweeps.driver import run_sweep

    lock_file = "writer.lock"  # trainers.writer_lock.LOCK_FILE
    cfg = load_train_config(None, items(tmp_path, "writer", "budget.steps=2"))
    other = load_train_config(None, items(tmp_path, "other", "budget.steps=2"))
    plan, other_plan = plan_run(cfg), plan_run(other)
    locks = [Path(p.state_dir) / lock_file for p in (plan, other_plan)]
    holder = subprocess.Popen(["sleep", "60"])
    try:
        for lock in locks:  # as if another live process held them
            lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(
            ConfigError, match=rf"name: run 'writer' is being written by pid {holder.pid}"
        ):
            plan_run(cfg)
        sweep = validate(SweepSpec, tiny_spec_dict(tmp_path, "locked-sweep"))
        sweep_lock = tmp_path / "sweeps" / "locked-sweep" / lock_file
        sweep_lock.parent.mkdir(parents=True)
        sweep_lock.write_text(json.dumps({"host": socket.gethostname(), "pid": holder.pid}))
        with pytest.raises(
            ConfigError, match=rf"sweep 'locked-sweep' is being written by pid {holder.pid}"
        ):
            run_sweep(plan_sweep(sweep))
    finally:
        holder.kill()
        holder.wait()
    again = plan_run(cfg)  # the holder is dead: both runs were left RUNNING by a "kill"
    client = MlflowClient(plan.tracking_uri)
    assert again.run_id == plan.run_id and again.resumed_run
    reopened = client.get_run(plan.run_id)  # it goes on: running, no longer interrupted
    assert reopened.info.status == "RUNNING" and "mor.interrupted" not in reopened.data.tags
    killed = client.get_run(other_plan.run_id)
    assert killed.info.status == "KILLED" and killed.data.tags["mor.interrupted"] == "true"
    assert not locks[1].exists()
    from trainers.writer_lock import release

    release(Path(plan.state_dir))
    assert not locks[0].exists()
    from trainers.launcher import record_failure

    client.set_terminated(plan.run_id, status="FINISHED")
    record_failure(again, "a failed rerun")  # a finished run is never flipped to FAILED
    assert client.get_run(plan.run_id).info.status == "FINISHED"

    bad = load_train_config(None, items(tmp_path, "ro", f"storage_path={locks[1].parent / 'x'}"))
    (locks[1].parent / "x").write_text("a file, not a folder")
    start = time.monotonic()
    with pytest.raises(ConfigError, match=r"storage_path: .* is not writable"):
        plan_run(bad)
    full_disk = types.SimpleNamespace(total=2**30, used=2**30 - 2**20, free=2**20)
    monkeypatch.setattr("trainers.launcher.shutil.disk_usage", lambda path: full_disk)
    with pytest.raises(ConfigError, match=r"storage_path: .* has 1 MiB free"):
        plan_run(load_train_config(None, items(tmp_path, "full")))
    assert time.monotonic() - start < 20
    assert not (tmp_path / "runs" / "full").exists()  # no MLflow run was created


def test_concurrent_first_runs_create_the_mlflow_store_once(tmp_path: Path) -> None:
    """Three first runs at once on a fresh sqlite store: before the creation lock, two of
    them failed in MLflow's schema migration (alembic CommandError, 'table … already exists')."""
    code = (
        f"from trainers.tracking import connect; connect('sqlite:///{tmp_path}/mlflow.db', 'race')"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errors
    ids = {MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_experiment_by_name("race")}
    assert None not in ids
