"""platform/ files and the local stack's commands without a running stack: configs parse and
carry what each tool needs; every command finds Ray and MLflow the same way (core.endpoints);
refusals (a taken port, an unreachable Ray) come in seconds. A real running stack is
tests/test_stack.py."""

from __future__ import annotations

import http.server
import json
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml
from conftest import TINY_TRAIN

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
