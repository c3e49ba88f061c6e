"""platform/ files and the local stack (`mor up|status|down`): configs parse and carry what each
tool needs; every command finds Ray and MLflow the same way (core.endpoints); a real stack on
loopback trains a plain `mor train` and a submitted sweep into its own MLflow server, and
`mor down` leaves no process behind."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import re
import socket
import subprocess
import threading
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from cli.main import main as mor_main

ROOT = Path(__file__).resolve().parents[1]
PLATFORM = ROOT / "platform"
IMAGE = "registry.example.com/mor/mor-platform:0.1.0"


def _load(rel: str) -> dict[str, Any]:
    return yaml.safe_load((PLATFORM / rel).read_text())


# ------------------------------------------------------------------ platform/ files
def test_platform_is_never_a_python_package() -> None:
    offenders = [p for p in PLATFORM.rglob("*") if p.suffix == ".py" or p.name == "__init__.py"]
    assert offenders == []


def test_cluster_launcher_config() -> None:
    cfg = _load("cluster/ray-cluster.yaml")
    assert cfg["cluster_name"]
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"]
    nodes = cfg["available_node_types"]
    assert cfg["head_node_type"] in nodes
    for name, node in nodes.items():
        assert "resources" in node and "InstanceType" in node["node_config"], name
    gpu = [n for n in nodes.values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu and all(n["node_config"]["InstanceType"].startswith(("g5", "p4d")) for n in gpu)
    assert cfg["docker"]["image"] == IMAGE
    assert isinstance(cfg["setup_commands"], list)
    head = " ".join(cfg["head_start_ray_commands"])
    worker = " ".join(cfg["worker_start_ray_commands"])
    assert "ray start --head" in head and "--port=6379" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    # Token authentication on every node, the token file shipped to the nodes.
    assert "RAY_AUTH_MODE=token" in head and "RAY_AUTH_MODE=token" in worker
    assert any("auth_token" in k for k in cfg["file_mounts"])


def _containers(template: dict[str, Any]) -> list[dict[str, Any]]:
    return template["spec"]["containers"]


def _check_cluster_spec(spec: dict[str, Any]) -> None:
    assert spec["authOptions"]["mode"] == "token"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(c["image"] == IMAGE for c in _containers(head["template"]))
    groups = spec["workerGroupSpecs"]
    assert groups
    for g in groups:
        assert g["replicas"] >= 1 and g["groupName"]
        for c in _containers(g["template"]):
            assert c["image"] == IMAGE
            assert int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1


def test_kuberay_raycluster() -> None:
    rc = _load("k8s/raycluster.yaml")
    assert rc["apiVersion"] == "ray.io/v1" and rc["kind"] == "RayCluster"
    assert rc["metadata"]["name"]
    _check_cluster_spec(rc["spec"])


def test_kuberay_rayjob() -> None:
    job = _load("k8s/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert "mor sweep run sweeps/configs/quickstart.yaml" in spec["entrypoint"]
    assert (ROOT / "sweeps/configs/quickstart.yaml").is_file()
    assert "rayClusterSpec" in spec or "clusterSelector" in spec
    _check_cluster_spec(spec["rayClusterSpec"])
    head = _containers(spec["rayClusterSpec"]["headGroupSpec"]["template"])[0]
    env = {e["name"]: e for e in head["env"]}
    assert "secretKeyRef" in env["MLFLOW_TRACKING_URI"]["valueFrom"]


def test_dockerfile_and_lock() -> None:
    lines = [
        ln.strip()
        for ln in (PLATFORM / "docker/Dockerfile").read_text().splitlines()
        if ln.strip() and not ln.strip().startswith("#")
    ]
    base = next(ln.split("=", 1)[1] for ln in lines if ln.startswith("ARG BASE_IMAGE="))
    assert re.fullmatch(r"pytorch/pytorch:2\.13\.0-cuda[\d.]+-cudnn\d+-devel", base)
    assert any(ln.startswith("FROM ${BASE_IMAGE}") for ln in lines)
    text = "\n".join(lines)
    assert re.search(r"pip install .*--constraint platform/docker/requirements\.lock \.", text)
    assert "COPY pyproject.toml" in text
    pins = {}
    for ln in (PLATFORM / "docker/requirements.lock").read_text().splitlines():
        if ln and not ln.startswith("#"):
            name, _, version = ln.partition("==")
            assert version, f"unpinned: {ln}"
            pins[name.lower().replace("_", "-")] = version
    from importlib.metadata import version

    for pkg in ("ray", "deepspeed", "lm-eval", "mlflow", "datasets"):
        assert pins[pkg] == version(pkg), pkg
    assert pins["torch"] == version("torch").split("+")[0]


def test_mlflow_compose() -> None:
    compose = _load("mlflow/docker-compose.yaml")
    services = compose["services"]
    assert services["postgres"]["image"].startswith("postgres:")
    cmd = services["mlflow"]["command"]
    cmd = " ".join(cmd) if isinstance(cmd, list) else cmd
    assert re.search(r"--backend-store-uri postgresql(\+psycopg2)?://", cmd)
    assert "--artifacts-destination s3://" in cmd and "--serve-artifacts" in cmd
    env = services["mlflow"]["environment"]
    for var in ("MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert var in env
    assert "postgres" in services["mlflow"]["depends_on"]
    readme = (PLATFORM / "README.md").read_text()
    for var in (
        "MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "MOR_STACK_DIR", "MOR_CACHE_DIR", "RAY_ADDRESS",
        "RAY_API_SERVER_ADDRESS",
    ):  # fmt: skip
        assert var in readme, var


# ------------------------------------------------------------------ endpoints (no real stack)
class _Answer(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def fake_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A stack record whose "processes" are this test process and whose endpoints are two
    local HTTP servers: healthy by the one health check, without Ray or MLflow."""
    from core.stack import MlflowService, RayService, StackRecord

    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # auth "on" without touching Ray's state
    state = tmp_path / "stack"
    state.mkdir()
    monkeypatch.setenv("MOR_STACK_DIR", str(state))
    servers = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answer) for _ in range(2)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    dash, ml = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    me = (os.getpid(), psutil.Process().create_time())
    record = StackRecord(
        id="fake", state_dir=str(state), host="127.0.0.1", status="up",
        ray=RayService(
            ports={}, address="127.0.0.1:7000", dashboard=dash, agent_port=1,
            client_server_port=2, log="", pids={"gcs_server": me, "raylet": me},
        ),
        mlflow=MlflowService(port=0, url=ml, log="", pid=me[0], create_time=me[1]),
    )  # fmt: skip
    try:
        yield record, servers
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()


def test_endpoints_precedence(
    fake_stack: tuple[Any, list], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cli.report_cmd import default_uri
    from core.endpoints import resolve_endpoints, resolve_tracking_uri
    from core.stack import healthy_stack, write_record
    from sweeps.driver import tracking_uri_for
    from sweeps.jobs import portable_spec
    from sweeps.spec import SweepSpec
    from trainers.config import TrainConfig, default_tracking_uri

    record, servers = fake_stack
    cfg = TrainConfig(storage_path=str(tmp_path))
    spec = SweepSpec(name="s", storage_path=str(tmp_path))
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # No stack recorded: a fresh local Ray, an absolute sqlite store, no job server.
    ep = resolve_endpoints(storage_path=tmp_path)
    assert (ep.ray_address, ep.job_server, ep.tracking_uri) == ("local", None, local)
    assert not ep.ray_token_auth  # a fresh local Ray needs none
    assert default_tracking_uri(cfg) == local == tracking_uri_for(spec)
    monkeypatch.chdir(tmp_path)
    assert resolve_tracking_uri(None, "rel") == f"sqlite:///{tmp_path / 'rel' / 'mlflow.db'}"

    write_record(record)  # healthy: every command defaults to it
    assert healthy_stack() == record
    ep = resolve_endpoints(target="jobs")
    assert (ep.ray_address, ep.job_server) == ("127.0.0.1:7000", record.ray.dashboard)
    assert ep.ray_token_auth
    ml = record.mlflow.url
    assert default_tracking_uri(cfg) == ml == tracking_uri_for(spec) == default_uri()
    assert portable_spec(spec, record.ray.dashboard + "/").tracking.uri == ml
    # A job for another cluster cannot reach this machine's stack: absolute sqlite instead.
    assert portable_spec(spec, "http://elsewhere:8265").tracking.uri == local
    assert resolve_tracking_uri(None, tmp_path, recorded="http://train:5000") == "http://train:5000"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    ep = resolve_endpoints(storage_path=tmp_path)
    assert (ep.ray_address, ep.tracking_uri) == ("10.0.0.1:6379", "http://env:5000")
    assert resolve_tracking_uri(None, tmp_path, recorded="http://train:5000") == "http://train:5000"
    ep = resolve_endpoints(ray_address="h:1", tracking_uri="x", recorded="y")
    assert (ep.ray_address, ep.tracking_uri) == ("h:1", "x")

    # One meaning of "up": an endpoint that stops answering, or a recorded process that is
    # not the one running under that pid, is no stack.
    monkeypatch.delenv("RAY_ADDRESS")
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    servers[1].shutdown()
    servers[1].server_close()
    assert healthy_stack() is None and default_tracking_uri(cfg) == local
    servers[1:] = []
    ml_alive = record.model_copy(deep=True)
    ml_alive.mlflow.url = record.ray.dashboard  # answers again
    write_record(ml_alive)
    assert healthy_stack() is not None
    ml_alive.mlflow.create_time = record.mlflow.create_time - 100  # a reused pid
    write_record(ml_alive)
    assert healthy_stack() is None and resolve_endpoints().ray_address == "local"


def _free_port() -> int:
    # Ephemeral ports (32768+) stay clear of Ray's worker ports (10002-19999) and 10001.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_up_refuses_a_taken_port(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        argv = ["up", "--state-dir", str(tmp_path), "--ray-port", str(_free_port())]
        argv += ["--dashboard-port", str(_free_port()), "--mlflow-port", str(port)]
        assert mor_main(argv) == 2
    err = capsys.readouterr().err
    assert "--mlflow-port" in err and str(port) in err
    assert not (tmp_path / "stack.json").exists()


def test_status_and_down_without_a_stack(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert mor_main(["status", "--state-dir", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["healthy"] is False
    assert mor_main(["down", "--state-dir", str(tmp_path)]) == 0


def test_a_stack_recorded_by_version_1_is_still_found(tmp_path: Path) -> None:
    """A stack started before the typed record (flat port fields) is still read, so that
    `mor status` and `mor down` find its processes instead of forgetting them."""
    from core.stack import read_record

    old = {
        "version": 1, "status": "up", "id": "abc", "state_dir": str(tmp_path),
        "host": "127.0.0.1", "started_at": "",
        "ray": {
            "port": 6390, "dashboard_port": 8290, "address": "127.0.0.1:6390",
            "dashboard": "http://127.0.0.1:8290", "agent_port": 1, "client_server_port": 2,
            "log": "ray.log", "session": 5, "pid": 7, "pids": {"gcs_server": [7, 1.0]},
        },
        "mlflow": {"port": 5090, "url": "http://127.0.0.1:5090", "log": "m.log", "pid": 8,
                   "pgid": 8, "create_time": 2.0},
    }  # fmt: skip
    (tmp_path / "stack.json").write_text(json.dumps(old))
    record = read_record(tmp_path)
    assert record is not None and record.ray.ports == {"gcs": 6390, "dashboard": 8290}
    assert record.ray.pid == 7 and record.mlflow.pid == 8


def test_an_unreachable_ray_address_is_an_error_in_seconds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """`mor train --address HOST:PORT` where nothing listens: Ray would retry for minutes;
    the platform says so in seconds and the run it planned is FAILED, not RUNNING."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MOR_STACK_DIR", str(tmp_path / "no-stack"))
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    args = ["train", *TINY_TRAIN, "name=dead-ray", f"storage_path={tmp_path}"]
    started = time.monotonic()
    assert mor_main([*args, "--address", f"127.0.0.1:{dead}"]) == 1
    assert time.monotonic() - started < 120
    assert f"127.0.0.1:{dead}" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("mor").experiment_id])
    assert run.info.status == "FAILED" and "nothing answers" in run.data.tags["mor.failure"]


# ------------------------------------------------------------------ the real stack
SWEEP = {
    "name": "stack-sweep",
    "base": {
        "model": {"preset": "micro", "num_layers": 6, "max_seq_len": 64},
        "data": {"source": "default", "vocab_size": 512, "seq_len": 64, "max_documents": 150},
        "batch": {"micro_batch_size": 4},
        "checkpoint": {"every_steps": 20},
        "eval": {"every_steps": 1000, "batches": 2},
    },
    "variants": [
        {
            "name": "mor-ec",
            "model.sharing": "middle_cycle",
            "model.num_recursions": 2,
            "model.router": "expert_choice",
        }
    ],
    "budgets": [6e9],
    "eval": {"limit": 10, "tasks": ["mor_heldout_mc"]},
}
# `mor train` as a user types it, on the smallest model and data (the tiny sweep's base).
TINY_TRAIN = [
    "model.preset=micro", "model.num_layers=6", "model.max_seq_len=64",
    "data.vocab_size=512", "data.seq_len=64", "data.max_documents=150",
    "batch.micro_batch_size=4", "budget.steps=3", "eval.every_steps=1000", "eval.batches=2",
]  # fmt: skip


def _tagged(stack_id: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MOR_STACK_ID") == stack_id and p.status() != "zombie":
                out.append(p)
        except psutil.Error:
            continue
    return out


@dataclass
class Stack:
    state: Path
    ports: dict[str, int]
    env: dict[str, str]
    mlflow: str
    dashboard: str


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory):
    """One real stack for the module, started as a user does (`mor up` with $MOR_STACK_DIR
    and free ports); whatever happens, it is torn down afterwards."""
    from core.stack import down, read_record

    state = tmp_path_factory.mktemp("stack")
    ports = {"--ray-port": _free_port(), "--dashboard-port": _free_port()}
    ports["--mlflow-port"] = _free_port()
    assert len(set(ports.values())) == 3
    env = {k: v for k, v in os.environ.items() if k not in STACK_ENV}
    env["MOR_STACK_DIR"] = str(state)
    argv = ["mor", "up"] + [x for kv in ports.items() for x in (kv[0], str(kv[1]))]
    with pytest.MonkeyPatch.context() as mp:  # this process finds the stack too
        for var in STACK_ENV:
            mp.delenv(var, raising=False)
        mp.setenv("MOR_STACK_DIR", str(state))
        try:
            up = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=400)
            assert up.returncode == 0, up.stdout + up.stderr
            assert "stack up" in up.stdout
            yield Stack(
                state, ports, env,
                f"http://127.0.0.1:{ports['--mlflow-port']}",
                f"http://127.0.0.1:{ports['--dashboard-port']}",
            )  # fmt: skip
        finally:
            record = read_record(state)
            down(state)
            if record:  # belt and braces: nothing tagged may outlive the module
                for p in _tagged(record.id):
                    p.kill()


STACK_ENV = ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_MODE")


def _mlflow_get(base: str, path: str, **params: str) -> dict:
    url = f"{base}{path}?{urllib.parse.urlencode(params)}"
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def _mlflow_post(base: str, path: str, body: dict) -> dict:
    req = urllib.request.Request(
        f"{base}{path}", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


# Listening sockets of the stack that are not on loopback, as (process name, address): none.
# Ray's single-machine mode (core.stack.RAY_LOCAL_ONLY_ENV) keeps every Ray service on
# 127.0.0.1; without it the GCS, raylet, agents, workers and Ray client server listened on
# the host's address or all interfaces (issue 19). Exactly what is observed: a new exposed
# port fails the test.
EXPOSED_ALLOWED: set[tuple[str, str]] = set()


def _exposed(record: Any) -> tuple[set[tuple[str, str]], set[int]]:
    """Listening TCP sockets of the stack's processes that are not on loopback, and their
    ports: from psutil, and from `ss -ltnp` (the kernel's table, as a user would check)."""
    import ipaddress

    from core.stack import owned_processes

    def loopback(host: str) -> bool:
        ip = ipaddress.ip_address(host.strip("[]").split("%")[0])
        return (getattr(ip, "ipv4_mapped", None) or ip).is_loopback  # ::ffff:127.0.0.1

    procs = {p.pid: p for p in owned_processes(record)}
    exposed, ports = set(), set()
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    ports.add(c.laddr.port)
                    if not loopback(c.laddr.ip):
                        exposed.add((p.name(), c.laddr.ip))
    ss = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    for line in ss.splitlines():  # Local Address:Port is the 4th column; then users:((...))
        host = line.split()[3].rpartition(":")[0]
        pids = {int(x) for x in re.findall(r"pid=(\d+)", line)}
        if pids & procs.keys() and (host == "*" or not loopback(host)):  # *: any address
            exposed.add(("ss", host))
    return exposed, ports


@pytest.mark.slow
def test_stack_status_and_idempotent_up(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from core.stack import healthy_stack
    from trainers.config import TrainConfig, default_tracking_uri

    record = healthy_stack()
    assert record is not None and record.status == "up"
    assert record.ray.address == f"127.0.0.1:{stack.ports['--ray-port']}"
    assert (record.ray.dashboard, record.mlflow.url) == (stack.dashboard, stack.mlflow)
    assert default_tracking_uri(TrainConfig(storage_path=str(tmp_path))) == stack.mlflow
    assert mor_main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"] is True
    argv = ["up"] + [x for kv in stack.ports.items() for x in (kv[0], str(kv[1]))]
    t0 = time.time()
    assert mor_main(argv) == 0  # idempotent: finds the running stack
    assert "already running" in capsys.readouterr().out and time.time() - t0 < 30
    assert healthy_stack() == record
    exposed, ports = _exposed(record)  # GCS, raylet, agents, client server, metrics, MLflow
    assert exposed == EXPOSED_ALLOWED and len(ports) >= 8, (exposed, ports)
    assert {stack.ports[k] for k in stack.ports} <= ports


def _mor(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    run = subprocess.run(
        ["mor", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=900
    )
    # Ray's actors print their own (handled) tracebacks with a "(Actor pid=N)" prefix; a
    # traceback of the `mor` process itself starts a line.
    out = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    assert not [ln for ln in out.splitlines() if ln.startswith("Traceback")], out[-4000:]
    return run


@pytest.mark.slow
def test_train_with_the_stack_up(stack: Stack, tmp_path: Path) -> None:
    """Regression: with `mor up` running, a plain `mor train CONFIG` failed with Ray's
    InvalidAuthToken (only the sweep commands enabled token auth) and left its run RUNNING."""
    from mlflow import MlflowClient

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"name": "on-stack", "storage_path": str(tmp_path)}))
    # The README's `mor data prepare` on the stack's Ray (a Ray Data task per file), then
    # `mor train ... data.source=PREPARED`.
    from mor.corpus import default_corpus_documents

    docs = default_corpus_documents()[:120]
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"part{i}.txt").write_text("\n\n".join(docs[i::3]))
    prepared = tmp_path / "prepared"
    args = ["data", "prepare", str(tmp_path / "corpus"), "--out", str(prepared), "vocab_size=512"]
    prep = _mor(args, stack.env, tmp_path)
    assert prep.returncode == 0, (prep.stdout + prep.stderr)[-4000:]
    assert f"mor train data.source={prepared}" in prep.stdout
    assert len(json.loads((prepared / "manifest.json").read_text())["shards"]["train"]) == 3
    run = _mor(["train", str(config), *TINY_TRAIN, f"data.source={prepared}"], stack.env, tmp_path)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    assert f"at {stack.mlflow}" in run.stdout  # tracked on the stack with no flag
    # The console: each progress line once (Ray Train's print patch printed them twice), the
    # validation loss named val_loss, no `Reporting training result N: TrainingReport(...)`.
    console = re.sub(r"\x1b\[[0-9;]*m", "", run.stdout + run.stderr)
    for step in (1, 2, 3):
        assert len(re.findall(rf"\[mor\] on-stack step {step}/3 \(", console)) == 1, console
    assert re.search(r"step 3/3 \(100%\) [0-9:]+ elapsed, ETA 0:00 \| train_loss [0-9.]+ \| "
                     r"val_loss [0-9.]+ \| [0-9,]+ tok/s", console), console  # fmt: skip
    assert "TrainingReport(" not in console
    run_id = re.search(r"done: MLflow run (\w+)", run.stdout).group(1)
    info = MlflowClient(stack.mlflow).get_run(run_id)
    assert info.info.status == "FINISHED" and info.info.run_name == "on-stack"
    assert "mor.failure" not in info.data.tags
    # The README's `mor eval EXPORT`, no tracking flag, the stack still up: the eval run lands
    # on the stack's MLflow under the training run (the export records where it came from).
    export = tmp_path / "runs" / "on-stack" / "export"
    args = ["eval", str(export), "--tasks", "mor_heldout_mc", "--limit", "4", "--depths", "1"]
    ev = _mor(args, stack.env, tmp_path)
    assert ev.returncode == 0, (ev.stdout + ev.stderr)[-4000:]
    eval_id = re.search(r"MLflow eval run: (\w+)", ev.stdout).group(1)
    eval_run = MlflowClient(stack.mlflow).get_run(eval_id)
    assert eval_run.data.tags["mlflow.parentRunId"] == run_id
    assert eval_run.info.run_name == "eval · on-stack"  # named by its model


@pytest.mark.slow
def test_sweep_submitted_to_the_stack(
    stack: Stack, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A sweep submitted with no --address and no tracking URI: both default to the stack."""
    from sweeps import jobs

    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**SWEEP, "storage_path": str(tmp_path / "out")}))
    assert mor_main(["sweep", "submit", str(spec)]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    dashboard, deadline = stack.dashboard, time.time() + 360
    while (state := jobs.status(job_id, dashboard)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, jobs.logs(job_id, dashboard)[-3000:]
        time.sleep(3)
    assert state == "SUCCEEDED", jobs.logs(job_id, dashboard)[-3000:]

    exp = _mlflow_get(
        stack.mlflow, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="mor-sweeps"
    )["experiment"]
    runs = _mlflow_post(
        stack.mlflow,
        "/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp["experiment_id"]], "max_results": 100},
    )["runs"]
    tags = [{t["key"]: t["value"] for t in r["data"].get("tags", [])} for r in runs]
    parents = [r for r, t in zip(runs, tags) if t.get("mor.kind") == "sweep"]
    assert [r["info"]["run_name"] for r in parents] == ["stack-sweep"]
    parent = parents[0]["info"]
    assert parent["status"] == "FINISHED"
    trials = [r for r, t in zip(runs, tags) if t.get("mlflow.parentRunId") == parent["run_id"]]
    assert len(trials) == 1 and trials[0]["info"]["status"] == "FINISHED"
    # Named for people by variant and budget; the internal name (storage folder) is a tag.
    assert trials[0]["info"]["run_name"] == "mor-ec @ 6e9"
    assert tags[runs.index(trials[0])]["mor.run_name"].startswith("stack-sweep-")


@pytest.mark.slow
def test_down_stops_exactly_the_stack(stack: Stack, capsys: pytest.CaptureFixture) -> None:
    """`mor down`: exactly our processes stop, none survives, every port is free again.
    (Last in the module: it takes the module's stack down.)"""
    from core.endpoints import resolve_endpoints
    from core.stack import healthy_stack, port_free, read_record

    record = read_record(stack.state)
    assert record is not None
    # After a `mor train` driver and a sweep job ran on it: their workers too.
    assert _exposed(record)[0] == EXPOSED_ALLOWED
    session = record.ray.session
    ours = {p.pid: p for p in _tagged(record.id)}
    assert record.mlflow.pid in ours and record.ray.pid in ours
    assert mor_main(["down"]) == 0
    assert "stack down" in capsys.readouterr().out
    assert not (stack.state / "stack.json").exists()
    assert _tagged(record.id) == []
    for p in ours.values():
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    for p in psutil.process_iter():
        try:
            alive = p.status() != psutil.STATUS_ZOMBIE
            assert not (alive and os.getsid(p.pid) == session), p
        except (psutil.Error, OSError):
            continue
    assert port_free("0.0.0.0", stack.ports["--ray-port"])
    assert port_free("127.0.0.1", stack.ports["--dashboard-port"])
    assert port_free("127.0.0.1", stack.ports["--mlflow-port"])
    assert healthy_stack() is None and resolve_endpoints().ray_address == "local"
    assert mor_main(["status"]) == 1
