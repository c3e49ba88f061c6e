"""A real two-node Ray cluster on one machine (`mor up --nodes 2`): DeepSpeed training with one
worker per node (STRICT_SPREAD, gloo over TCP between the nodes), a node lost mid-run and
restarted (the run resumes from its last checkpoint), and an impossible placement refused.

One cluster for the module, started as a user does and stopped by the stack's recorded pids.
Prepared data, checkpoints and exports live only on object storage (the ``storage`` fixture:
moto's S3 server on 127.0.0.1, no disk shared through the storage path); MLflow is the
stack's server.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from core.keys import TAG_RESUMED_FROM_STEP
from core.storage import Location
from trainers.checkpointing import SNAPSHOT
from trainers.config import load_train_config
from trainers.launcher import ResourceError, check_resources, run_training
from trainers.run_store import RAY_SUBDIR

pytestmark = [pytest.mark.slow, pytest.mark.extended]  # python -m pytest -q tests -m extended

STACK_ENV = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")
# The head's GCS declares a node dead after 3 failed health checks 0.5 s apart (Ray's
# default: 5 × 3 s), so a lost node is noticed in seconds.
FAST_FAILURE_DETECTION = {
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "2000",
    "RAY_health_check_failure_threshold": "3",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    state: Path
    env: dict[str, str]
    dashboard: str
    mlflow: str
    data: str
    """The tiny corpus, prepared (tokenizer included) under the storage path."""

    def record(self) -> Any:
        from core.stack import read_record

        return read_record(self.state)

    def mor_up(self) -> subprocess.CompletedProcess:
        """`mor up --nodes 2` as a user types it (a running stack: a lost node restarted)."""
        return subprocess.run(
            ["mor", "up", "--nodes", "2", "--cpus-per-node", "1"],
            env=self.env, capture_output=True, text=True, timeout=400,
        )  # fmt: skip


@pytest.fixture(scope="module")
def storage(s3: str) -> str:
    """Where runs, checkpoints and prepared data go: only object storage (moto's S3 server on
    127.0.0.1, started first so that every node's processes inherit its AWS_* variables), as
    on a cluster without a shared disk. A local folder works the same: return one instead."""
    return f"{s3}/multinode"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, storage: str):
    """`mor up --nodes 2 --cpus-per-node 1`: a head and a second node, 1 CPU each; the data
    is prepared (in this process, no Ray) while it starts."""
    from core.stack import down
    from trainers.data import DataConfig, prepare_data

    state = tmp_path_factory.mktemp("multinode-stack")
    env = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
    env.update(FAST_FAILURE_DETECTION, MOR_STACK_DIR=str(state))
    ports = {"--ray-port": _free_port(), "--dashboard-port": _free_port()}
    ports["--mlflow-port"] = _free_port()
    argv = ["mor", "up", "--nodes", "2", "--cpus-per-node", "1"]
    argv += [x for kv in ports.items() for x in (kv[0], str(kv[1]))]
    with pytest.MonkeyPatch.context() as mp:  # this process uses the cluster too
        for var in STACK_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("MOR_STACK_DIR", str(state))
        up = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True)  # fmt: skip
        try:
            data = DataConfig(source="default", vocab_size=512, seq_len=64, max_documents=150,
                              prepare_workers=1, cache_dir=str(state / "cache"))  # fmt: skip
            prepared = str(prepare_data(data, out=f"{storage}/data").dir)
            out, _ = up.communicate(timeout=400)
            assert up.returncode == 0, out
            yield Cluster(
                state, env,
                f"http://127.0.0.1:{ports['--dashboard-port']}",
                f"http://127.0.0.1:{ports['--mlflow-port']}",
                prepared,
            )  # fmt: skip
        finally:
            if up.poll() is None:
                up.kill()
                up.wait()
            down(state)  # by the recorded pids, sessions and the stack's tag


@pytest.fixture(scope="module")
def driver(cluster: Cluster):
    """This process's Ray driver on the cluster (on the head: Ray prefers it), for the
    module: `run_training` then uses it instead of connecting for each run."""
    import ray

    from core.endpoints import resolve_endpoints

    ray.init(address=resolve_endpoints().ray_address, configure_logging=False)
    yield
    ray.shutdown()


def _config(storage: str, data: str, name: str, *extra: str) -> Any:
    return load_train_config(
        None,
        [
            f"name={name}", f"storage_path={storage}", f"data.source={data}",
            "data.seq_len=64", "model.preset=micro", "model.num_layers=6",
            "model.max_seq_len=64", "batch.micro_batch_size=4", "eval.every_steps=1000",
            "eval.batches=1", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
            "scaling.placement_strategy=STRICT_SPREAD", "deepspeed.zero_stage=2",
            "log_every_steps=3", *extra,
        ],
    )  # fmt: skip


def _workers(dashboard: str) -> dict[str, tuple[str, str]]:
    """Every Ray Train worker actor the cluster has had (dead ones stay listed): actor id →
    (its node's ``mor_node_<i>`` resource, node id). Ray's State API."""
    from ray.util.state import list_actors, list_nodes

    names = {}
    for n in list_nodes(address=dashboard, detail=True, raise_on_missing_output=False):
        for key in n.resources_total or {}:
            if key.startswith("mor_node_"):
                names[n.node_id] = key
    actors = list_actors(
        address=dashboard, filters=[("class_name", "=", "RayTrainWorker")], detail=True,
        limit=1000, raise_on_missing_output=False,
    )  # fmt: skip
    return {a.actor_id: (names.get(a.node_id, "?"), a.node_id) for a in actors}


def _new_workers(dashboard: str, before: dict[str, Any]) -> list[tuple[str, str]]:
    """(node resource, node id) of the worker actors not in ``before``, sorted."""
    return sorted(v for k, v in _workers(dashboard).items() if k not in before)


def _listening(procs: list[Any]) -> set[tuple[int, str]]:
    """(pid, address) of each listening TCP socket of ``procs``."""
    import psutil

    out = set()
    for p in procs:
        try:
            conns = p.net_connections(kind="tcp")
        except psutil.Error:
            continue
        out |= {(p.pid, c.laddr.ip) for c in conns if c.status == psutil.CONN_LISTEN}
    return out


def _checkpointed(storage: str, name: str) -> bool:
    """Ray Train registered a checkpoint of the run (its snapshot names it)."""
    return Location.parse(storage).child(RAY_SUBDIR, name, SNAPSHOT).is_file()


# ------------------------------------------------------------------ tests
def test_status_lists_the_second_node(cluster: Cluster) -> None:
    """`mor status` shows node 1 healthy; both nodes are registered with the head."""
    from core.nodes import node_processes, registered
    from core.stack import owned_processes

    status = subprocess.run(["mor", "status"], env=cluster.env, capture_output=True, text=True)
    assert status.returncode == 0, status.stdout
    assert "node 1  healthy" in status.stdout and "mor_node_1, 1 CPU" in status.stdout
    assert registered(cluster.dashboard) == {"mor_node_0": "ALIVE", "mor_node_1": "ALIVE"}
    # Node 1 is loopback-only like the head: no listening socket of the stack elsewhere.
    node1 = {p.pid for p in node_processes(cluster.record().nodes[0])}
    listening = _listening(owned_processes(cluster.record()))
    assert {pid for pid, _ in listening} & node1  # node 1's raylet and agents listen...
    assert {ip for _, ip in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}  # ...on loopback


def test_strict_spread_needs_a_node_per_worker(driver: None) -> None:
    """Three workers, one per node, on two nodes: refused in seconds, naming the field."""
    t0 = time.monotonic()
    with pytest.raises(ResourceError, match=r"scaling\.placement_strategy=STRICT_SPREAD"):
        check_resources(3, 1.0, 0.0, placement_strategy="STRICT_SPREAD")
    assert time.monotonic() - t0 < 5
    check_resources(2, 1.0, 0.0, placement_strategy="STRICT_SPREAD")  # fits: no error


def test_one_worker_per_node_and_a_lost_node(cluster: Cluster, driver: None, storage: str) -> None:
    """Two DeepSpeed workers with STRICT_SPREAD: one on each node. Node 1's raylet is killed
    (by pid) once the first checkpoint is registered and the node restarted (`mor up --nodes
    2`): Ray Train restarts both workers, one on each node again, from the last checkpoint."""
    name, events = "lose-a-node", {}
    cfg = _config(storage, cluster.data, name, "budget.steps=12", "checkpoint.every_steps=3",
                  "checkpoint.max_failures=3")  # fmt: skip
    raylet = cluster.record().nodes[0].raylet_pid

    def kill_then_restart() -> None:
        deadline = time.time() + 300
        while not _checkpointed(storage, name) and time.time() < deadline:
            time.sleep(0.2)
        events["first"] = {k: v for k, v in _workers(cluster.dashboard).items() if k not in before}
        os.kill(raylet, signal.SIGKILL)
        events["killed"] = time.time()
        events["up"] = cluster.mor_up()
        events["restarted"] = time.time()

    before = _workers(cluster.dashboard)
    killer = threading.Thread(target=kill_then_restart, daemon=True)
    killer.start()
    result = run_training(cfg)
    done = time.time()
    killer.join(timeout=400)
    assert "killed" in events, "no checkpoint was written"
    # The first attempt: one worker per node (a node's mor_node_<i> resource names it).
    first = sorted(events["first"].values())
    assert [n for n, _ in first] == ["mor_node_0", "mor_node_1"]
    up = events["up"]
    assert up.returncode == 0 and "node 1 is not running: restarting it" in up.stdout, up.stdout
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert result.tracking_uri == cluster.mlflow and run.info.status == "FINISHED"
    resumed = int(run.data.tags[TAG_RESUMED_FROM_STEP])
    assert resumed >= 3 and resumed % 3 == 0  # from a checkpoint, not from step 0
    steps = [m.step for m in client.get_metric_history(result.run_id, "train/loss")]
    assert steps == list(range(1, 13))  # no gaps, no repeats
    run_home = Location.parse(storage).child("runs", name)
    assert run_home.child("export", "model.pt").is_file()  # in the bucket
    assert any(n.startswith("checkpoint_") for n in Location.parse(storage).child(
        RAY_SUBDIR, name).names())  # fmt: skip
    # The second attempt: one worker per node again, node 1's on the restarted raylet.
    second = _new_workers(cluster.dashboard, {**before, **events["first"]})
    assert [n for n, _ in second] == ["mor_node_0", "mor_node_1"]
    assert second[0][1] == first[0][1]  # the head, as before
    assert second[1][1] != first[1][1]  # a new node id: the restarted node 1
    print(f"[test] kill → node back: {events['restarted'] - events['killed']:.1f} s, "
          f"kill → run finished: {done - events['killed']:.1f} s")  # fmt: skip


def test_sweep_trials_use_both_nodes(cluster: Cluster, driver: None, storage: str) -> None:
    """Two one-worker trials at once on two 1-CPU nodes: one trial's worker on each."""
    from mor.overrides import validate
    from sweeps.driver import run_sweep
    from sweeps.spec import SweepSpec

    spec = validate(
        SweepSpec,
        {
            "name": "two-nodes",
            "storage_path": storage,
            "base": {
                "model": {"preset": "micro", "num_layers": 6, "max_seq_len": 64},
                "data": {"source": cluster.data, "seq_len": 64},
                "batch": {"micro_batch_size": 4},
                "eval": {"every_steps": 1000, "batches": 1},
            },
            "variants": [
                {"name": "vanilla", "model.sharing": "none", "model.num_recursions": 1},
                {"name": "mor", "model.sharing": "middle_cycle", "model.num_recursions": 2},
            ],
            "budgets": [1e9],
            "eval": {"enabled": False},
            "resources": {"num_workers": 1, "cpus_per_worker": 1, "max_concurrent": 2},
        },
    )
    before = _workers(cluster.dashboard)
    result = run_sweep(spec)
    assert not result.errors and len(result.rows) == 2
    assert [n for n, _ in _new_workers(cluster.dashboard, before)] == ["mor_node_0", "mor_node_1"]
