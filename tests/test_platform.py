"""platform/ files and the local stack (`mor up|status|down`): configs parse and carry what each
tool needs; a real stack on loopback runs a submitted sweep into its own MLflow server and
`mor down` leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import urllib.parse
import urllib.request
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


# ------------------------------------------------------------------ stack defaults (no processes)
def _fake_record(state: Path, pid: int) -> None:
    state.mkdir(parents=True, exist_ok=True)
    record = {
        "status": "up",
        "ray": {"pid": pid, "address": "127.0.0.1:7000", "dashboard": "http://127.0.0.1:7001"},
        "mlflow": {"pid": pid, "url": "http://127.0.0.1:7002"},
    }
    (state / "stack.json").write_text(json.dumps(record))


def test_stack_defaults_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sweeps.driver import tracking_uri_for
    from sweeps.spec import SweepSpec
    from trainers.config import TrainConfig, default_tracking_uri
    from core.endpoints import default_ray_address, stack_mlflow_uri

    state = tmp_path / "stack"
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MOR_STACK_DIR", str(state))
    cfg = TrainConfig(storage_path=str(tmp_path))
    spec = SweepSpec(name="s", storage_path=str(tmp_path))
    local = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert stack_mlflow_uri() is None
    assert default_tracking_uri(cfg) == local == tracking_uri_for(spec)

    _fake_record(state, os.getpid())  # "alive": this process
    assert default_tracking_uri(cfg) == "http://127.0.0.1:7002" == tracking_uri_for(spec)
    assert default_ray_address() == "127.0.0.1:7000"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # Ray reads it: no stack default
    assert default_ray_address() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert default_tracking_uri(cfg) == "http://env:5000" == tracking_uri_for(spec)
    explicit = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={"uri": "x"})})
    assert default_tracking_uri(explicit) == "x"

    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    proc = psutil.Popen(["true"])
    proc.wait()
    _fake_record(state, proc.pid)  # a dead server is no default
    assert default_tracking_uri(cfg) == local


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


def _tagged(stack_id: str) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter():
        try:
            if p.environ().get("MOR_STACK_ID") == stack_id and p.status() != "zombie":
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.fixture
def stack_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A temporary MOR_STACK_DIR; whatever happens, the stack is torn down afterwards."""
    from cli.stack import down

    state = tmp_path / "stack"
    monkeypatch.setenv("MOR_STACK_DIR", str(state))
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(var, raising=False)
    try:
        yield state
    finally:
        record = None
        if (state / "stack.json").exists():
            record = json.loads((state / "stack.json").read_text())
            down(state)
        if record:  # belt and braces: nothing tagged may outlive the test
            for p in _tagged(record["id"]):
                p.kill()


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


@pytest.mark.slow
def test_stack_lifecycle(stack_env: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from cli.stack import port_free, stack_addresses
    from sweeps import jobs
    from trainers.config import TrainConfig, default_tracking_uri

    ports = {"--ray-port": _free_port(), "--dashboard-port": _free_port()}
    ports["--mlflow-port"] = _free_port()
    assert len(set(ports.values())) == 3
    argv = ["up"] + [x for kv in ports.items() for x in (kv[0], str(kv[1]))]
    assert mor_main(argv) == 0, capsys.readouterr()
    assert "stack up" in capsys.readouterr().out
    record = json.loads((stack_env / "stack.json").read_text())
    mlflow_url = f"http://127.0.0.1:{ports['--mlflow-port']}"
    dashboard = f"http://127.0.0.1:{ports['--dashboard-port']}"
    assert stack_addresses() == {
        "ray_dashboard": dashboard,
        "ray_address": f"127.0.0.1:{ports['--ray-port']}",
        "mlflow": mlflow_url,
    }
    assert default_tracking_uri(TrainConfig(storage_path=str(tmp_path))) == mlflow_url

    assert mor_main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["healthy"] is True
    t0 = time.time()
    assert mor_main(argv) == 0  # idempotent: finds the running stack
    assert "already running" in capsys.readouterr().out and time.time() - t0 < 30
    assert json.loads((stack_env / "stack.json").read_text())["ray"] == record["ray"]

    # A sweep submitted with no --address and no tracking URI: both default to the stack.
    spec = tmp_path / "sweep.yaml"
    spec.write_text(yaml.safe_dump({**SWEEP, "storage_path": str(tmp_path / "out")}))
    assert mor_main(["sweep", "submit", str(spec)]) == 0
    job_id = capsys.readouterr().out.strip().splitlines()[-1]
    deadline = time.time() + 360
    while (state := jobs.status(job_id, dashboard)) not in ("SUCCEEDED", "FAILED", "STOPPED"):
        assert time.time() < deadline, jobs.logs(job_id, dashboard)[-3000:]
        time.sleep(3)
    assert state == "SUCCEEDED", jobs.logs(job_id, dashboard)[-3000:]

    exp = _mlflow_get(
        mlflow_url, "/api/2.0/mlflow/experiments/get-by-name", experiment_name="mor-sweeps"
    )["experiment"]
    runs = _mlflow_post(
        mlflow_url,
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
    assert trials[0]["info"]["run_name"].startswith("stack-sweep-")

    # Down: exactly our processes stop, none survives, every port is free again.
    session = record["ray"]["session"]
    ours = {p.pid: p for p in _tagged(record["id"])}
    assert record["mlflow"]["pid"] in ours and record["ray"]["pid"] in ours
    assert mor_main(["down"]) == 0
    assert "stack down" in capsys.readouterr().out
    assert not (stack_env / "stack.json").exists()
    assert _tagged(record["id"]) == []
    for p in ours.values():
        assert not p.is_running() or p.status() == psutil.STATUS_ZOMBIE, p
    for p in psutil.process_iter():
        try:
            alive = p.status() != psutil.STATUS_ZOMBIE
            assert not (alive and os.getsid(p.pid) == session), p
        except (psutil.Error, OSError):
            continue
    assert port_free("0.0.0.0", ports["--ray-port"])
    assert port_free("127.0.0.1", ports["--dashboard-port"])
    assert port_free("127.0.0.1", ports["--mlflow-port"])
    assert stack_addresses() == {}
    assert mor_main(["status"]) == 1
