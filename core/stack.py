"""The local stack behind ``mor up|status|down``: a Ray head and an MLflow tracking server.

Both run as background services bound to 127.0.0.1 and are recorded in ``STATE/stack.json``
(STATE = ``--state-dir``, else $MOR_STACK_DIR, else ~/.mor/stack) as one typed
``StackRecord``, read and written only here. ``healthy_stack`` is the one meaning of "up"
that every command uses (``core/endpoints.py`` turns it into Ray and MLflow addresses): the
recorded processes are alive (pid and start time: a reused pid does not count) and both
endpoints answer over HTTP. ``mor up|status`` add the deep check: an authenticated Ray job
list, and the head's agent serving (jobs go through it). Extra Ray nodes on this machine
(``mor up --nodes N``, ``core.nodes``) are recorded with it; a lost one leaves the stack up
(commands still find the head) and is reported by ``check_nodes``, restarted by ``up``.

Ownership: every process the stack starts carries ``MOR_STACK_ID=<uuid>`` in its environment
(children inherit it, including Ray workers and Ray Job drivers, which Ray starts in sessions
of their own), and ``ray start`` runs in a new session. ``down`` stops exactly the processes
with that tag, in that session, or descended from them: never ``ray stop``, which would also
stop Ray clusters that someone else started on this machine. The process and port mechanics
(free ports, ownership, SIGTERM then SIGKILL) live in ``core.procs``.

Ray's token authentication stays on: the head starts with ``RAY_AUTH_MODE=token`` (unless the
user set the variable) and a token is generated if none exists (``ray get-auth-token
--generate``, saved to ~/.ray/auth_token); ``core.endpoints`` makes each command's Ray
clients send it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError, model_validator

from core.nodes import (
    NODE_RESOURCE,
    NodeStartError,
    RayNode,
    ensure_nodes,
    new_node,
    registered,
    start_node,
    wait_registered,
)
from core.procs import (
    adopt,
    console_script,
    free_port,
    owned,
    port_free,
    run_in_new_session,
    same_process,
    session_pids,
    stop,
    tail,
)
from core.quiet import node_env

STACK_DIR_ENV = "MOR_STACK_DIR"
STACK_FILE = "stack.json"
RECORD_VERSION = 2
TAG_ENV = "MOR_STACK_ID"
DEFAULT_PORTS = {"ray": 6379, "dashboard": 8265, "mlflow": 5000}
PORT_FLAGS = {"ray": "--ray-port", "dashboard": "--dashboard-port", "mlflow": "--mlflow-port"}
RAY_PROCESSES = ("gcs_server", "raylet", "dashboard")
# Ray (2.60) replaces a loopback --node-ip-address with the host's address, and its gRPC
# servers (GCS, raylet, agents, every worker), agents and Ray client server bind that address
# (or all interfaces), unless this switch is off: it is Ray's single-machine mode (the
# default on macOS and Windows), where the node's address stays 127.0.0.1. Read when Ray is
# imported; its processes inherit it.
RAY_LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and what to look at."""


class PortInUse(ValueError):
    """A requested port is taken by a process that is not ours (a usage error: exit 2)."""


# ----------------------------------------------------------------------------- the record
class RayService(BaseModel):
    ports: dict[str, int]
    """{"gcs": port, "dashboard": port}."""
    address: str
    """GCS address, for ``ray.init``."""
    dashboard: str
    """Dashboard and job server URL, for ``JobSubmissionClient``."""
    agent_port: int
    client_server_port: int
    log: str
    loopback_only: bool = False
    """Started in Ray's single-machine mode (``RAY_LOCAL_ONLY_ENV``): every Ray service
    listens on 127.0.0.1, and drivers must use that mode too (their node address must match
    the head's). False for a stack started by an older version."""
    session: int | None = None
    """Session id of ``ray start`` (its pid): the head's processes live in it."""
    pids: dict[str, tuple[int, float]] = {}
    """(pid, create_time) of gcs_server, raylet and dashboard."""
    num_cpus: int | None = None
    """CPUs the head offers (None: Ray's detection); set with extra nodes (``--nodes``)."""

    @property
    def pid(self) -> int | None:
        return self.pids["gcs_server"][0] if "gcs_server" in self.pids else None


class MlflowService(BaseModel):
    port: int
    url: str
    log: str
    pid: int | None = None
    create_time: float | None = None


class StackRecord(BaseModel):
    """``STATE/stack.json``."""

    @model_validator(mode="before")
    @classmethod
    def _from_version_1(cls, data: Any) -> Any:
        """A stack started by an older version (flat port fields) stays recognised, so that
        `mor status`/`mor down` still find and stop its processes."""
        if isinstance(data, dict) and data.get("version") == 1:
            ray = dict(data.get("ray") or {})
            ports = {"gcs": ray.get("port"), "dashboard": ray.get("dashboard_port")}
            ray.setdefault("ports", ports)
            data = {**data, "ray": ray}
        return data

    version: int = RECORD_VERSION
    status: Literal["starting", "up"] = "starting"
    id: str
    state_dir: str
    host: str
    started_at: str = ""
    ray: RayService
    mlflow: MlflowService
    nodes: list[RayNode] = []
    """Extra Ray nodes on this machine (``mor up --nodes N``: N - 1 of them)."""


def stack_dir() -> Path:
    """Where the stack keeps its state: $MOR_STACK_DIR, else ~/.mor/stack."""
    raw = os.environ.get(STACK_DIR_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".mor" / "stack"


def resolve_dir(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir).expanduser().resolve() if state_dir else stack_dir().resolve()


def read_record(state_dir: str | Path | None = None) -> StackRecord | None:
    """The stack's record, or None when there is none (or it cannot be read)."""
    try:
        text = (resolve_dir(state_dir) / STACK_FILE).read_text()
        return StackRecord.model_validate_json(text)
    except (OSError, ValidationError):
        return None


def write_record(record: StackRecord) -> None:
    state = Path(record.state_dir)
    tmp = state / (STACK_FILE + ".tmp")
    tmp.write_text(record.model_dump_json(indent=2))
    tmp.replace(state / STACK_FILE)  # atomic: readers never see half a record


# ----------------------------------------------------------------------------- health
@dataclass(frozen=True)
class ServiceHealth:
    pid: int | None
    pid_alive: bool
    """The recorded process runs (same start time: not a reused pid; not a zombie)."""
    answers: bool
    """Its endpoint answers (deep: an authenticated Ray job list)."""
    where: str

    @property
    def healthy(self) -> bool:
        return self.pid_alive and self.answers


def _http(url: str, any_status: bool = False, timeout: float = 3.0) -> bool:
    """GET url answers 200 (or, with any_status, anything: Ray's 401 means it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200 or any_status
    except urllib.error.HTTPError:
        return any_status
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _ray_jobs_answer(ray: RayService) -> bool:
    """The job server lists jobs (authenticated) and the head's agent, through which jobs
    go, is serving: what `mor sweep submit` relies on."""
    try:
        from ray.job_submission import JobSubmissionClient

        from core.endpoints import enable_ray_token_auth  # Ray auth has one home

        enable_ray_token_auth()
        JobSubmissionClient(ray.dashboard).list_jobs()
    except Exception:
        return False
    return not port_free("0.0.0.0", ray.agent_port)


def check(record: StackRecord, deep: bool = False) -> dict[str, ServiceHealth]:
    """Per service: the recorded processes alive and the endpoint answering. Cheap unless
    ``deep`` (which imports Ray): a few process lookups and two local HTTP requests."""
    ray = record.ray
    alive = all(
        same_process(*ray.pids.get(n, (None, None))) is not None for n in ("gcs_server", "raylet")
    )
    if deep:
        answers = alive and _ray_jobs_answer(ray)
    else:
        answers = alive and _http(f"{ray.dashboard}/api/version", any_status=True)
    ml = record.mlflow
    ml_alive = same_process(ml.pid, ml.create_time) is not None
    return {
        "ray": ServiceHealth(ray.pid, alive, answers, ray.dashboard),
        "mlflow": ServiceHealth(ml.pid, ml_alive, ml_alive and _http(f"{ml.url}/health"), ml.url),
    }


def is_healthy(report: dict[str, ServiceHealth]) -> bool:
    return bool(report) and all(s.healthy for s in report.values())


def healthy_stack(state_dir: str | Path | None = None, deep: bool = False) -> StackRecord | None:
    """The stack's record if it is up and healthy, else None: the one meaning of "up"."""
    record = read_record(state_dir)
    if record is None or record.status != "up" or not is_healthy(check(record, deep)):
        return None
    return record


# ----------------------------------------------------------------------------- up
def _ensure_ray_token(env: dict[str, str], log: Path) -> None:
    """Token mode for the head unless the user chose a mode; make sure a token exists."""
    env.setdefault("RAY_AUTH_MODE", "token")
    if env["RAY_AUTH_MODE"].lower() != "token":
        print(f"[mor] warning: RAY_AUTH_MODE={env['RAY_AUTH_MODE']} (set by you): the Ray head "
              "starts without token authentication")  # fmt: skip
        return
    # Prints the token, so its stdout is discarded; generates ~/.ray/auth_token only if no
    # token is configured ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or that file).
    with open(log, "ab") as err:
        rc = subprocess.run(
            [console_script("ray"), "get-auth-token", "--generate"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            timeout=120,
        ).returncode
    if rc != 0:
        raise StackError(f"could not find or generate a Ray auth token; see {log}")


def _start_mlflow(record: StackRecord, env: dict[str, str]) -> None:
    state = Path(record.state_dir)
    env = dict(env)
    # The server's job runner (GenAI scorers, a pool of huey consumers) is not used by the
    # platform and costs seconds and memory at start; telemetry would try the network.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cmd = [
        console_script("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
        # Artifacts go through the server (mlflow-artifacts:/ URIs), so clients never need
        # the server's disk: the same setup as a team server with S3 (platform/mlflow).
        "--serve-artifacts", "--artifacts-destination", (state / "mlartifacts").as_uri(),
        "--host", record.host, "--port", str(record.mlflow.port), "--workers", "1",
    ]  # fmt: skip
    with open(record.mlflow.log, "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            stdin=subprocess.DEVNULL, cwd=state,
        )  # fmt: skip
    adopt(proc)
    import psutil

    record.mlflow.pid = proc.pid
    record.mlflow.create_time = psutil.Process(proc.pid).create_time()


def _start_ray(record: StackRecord, env: dict[str, str]) -> None:
    """Run ``ray start --head`` in a new session; record the session and the head's pids."""
    ray, host = record.ray, record.host
    cmd = [
        console_script("ray"), "start", "--head",
        f"--node-ip-address={host}", f"--port={ray.ports['gcs']}",
        f"--dashboard-host={host}", f"--dashboard-port={ray.ports['dashboard']}",
        # Ray's fixed defaults (agent 52365, client server 10001) collide with any other Ray
        # on the machine; a head whose agent cannot bind accepts no job ("No available agent").
        f"--dashboard-agent-listen-port={ray.agent_port}",
        f"--ray-client-server-port={ray.client_server_port}",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    if ray.num_cpus is not None:  # a multi-node stack: the head is node 0 of N
        cmd += [f"--num-cpus={ray.num_cpus}", f'--resources={{"{NODE_RESOURCE.format(0)}": 1}}']
    session, rc = run_in_new_session(cmd, ray.log, env)
    if rc != 0:
        raise StackError(f"`ray start` failed (exit {rc}); its log {ray.log}:\n{tail(ray.log)}")
    ray.session = session
    ray.pids = session_pids(session, RAY_PROCESSES)


def _check_ports(host: str, ports: dict[str, int]) -> None:
    for key, port in ports.items():
        # Ray's GCS listens on every interface in cluster mode (a non-loopback --host); and
        # a port taken on any interface is taken for us.
        if not port_free("0.0.0.0" if key == "ray" else host, port):
            raise PortInUse(
                f"{PORT_FLAGS[key]}: port {port} is already in use by another process "
                f"(not this stack); choose a free one, e.g. `mor up {PORT_FLAGS[key]} "
                f"{port + 1}`"
            )
    if len(set(ports.values())) != len(ports):
        raise PortInUse(f"--ray-port, --dashboard-port, --mlflow-port must differ: {ports}")


def is_loopback(host: str) -> bool:
    return host == "localhost" or host.startswith("127.") or host == "::1"


def _new_record(state: Path, host: str, ports: dict[str, int]) -> StackRecord:
    url_host = f"[{host}]" if ":" in host else host
    loopback = is_loopback(host)
    # In single-machine mode Ray takes any loopback name for 127.0.0.1 (also ::1).
    gcs_host = "127.0.0.1" if loopback else url_host
    return StackRecord(
        id=uuid.uuid4().hex,
        state_dir=str(state),
        host=host,
        started_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        ray=RayService(
            ports={"gcs": ports["ray"], "dashboard": ports["dashboard"]},
            address=f"{gcs_host}:{ports['ray']}",
            dashboard=f"http://{url_host}:{ports['dashboard']}",
            agent_port=free_port(),
            client_server_port=free_port(),
            log=str(state / "ray-start.log"),
            loopback_only=loopback,
        ),
        mlflow=MlflowService(
            port=ports["mlflow"],
            url=f"http://{url_host}:{ports['mlflow']}",
            log=str(state / "mlflow.log"),
        ),
    )


def _wait_healthy(record: StackRecord, timeout: float) -> None:
    deadline = time.time() + timeout
    while not is_healthy(report := check(record, deep=True)):
        dead = [k for k, s in report.items() if not s.pid_alive]
        if dead or time.time() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not answering after {timeout}s"
            logs = "\n".join(f"--- {p}\n{tail(p)}" for p in (record.ray.log, record.mlflow.log))
            raise StackError(f"the stack did not start ({why}):\n{logs}")
        time.sleep(1.0)


def _stack_env(record: StackRecord) -> dict[str, str]:
    """The environment of every process the stack starts: tagged as its own, single-machine
    mode when loopback-only, Ray token auth (a token generated if none exists)."""
    env = {**os.environ, **node_env()}
    env[TAG_ENV] = record.id
    env[STACK_DIR_ENV] = record.state_dir  # jobs on this head find the stack (its MLflow) too
    if record.ray.loopback_only:  # Ray's processes, job drivers and workers inherit it
        env[RAY_LOCAL_ONLY_ENV] = "0"
    _ensure_ray_token(env, Path(record.ray.log))
    return env


def up(
    state_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    mlflow_port: int | None = None,
    timeout: float = 240.0,
    nodes: int | None = None,
    cpus_per_node: int | None = None,
) -> tuple[StackRecord, bool]:
    """Start the stack (or find it running); returns (record, started_now).

    ``nodes``: Ray nodes in all (the head and ``nodes - 1`` extra ones on this machine, each
    offering ``cpus_per_node`` CPUs, default the machine's cores split between them). On a
    running stack, a lost extra node is restarted (None: as many as recorded)."""
    state = resolve_dir(state_dir)
    running = healthy_stack(state, deep=True)
    if running is not None:
        target = nodes or len(running.nodes) + 1
        _ensure_nodes(running, target, cpus_per_node or running.ray.num_cpus, timeout)
        return running, False
    if (state / STACK_FILE).exists():  # stale or half-started: clear what is left of it first
        print(f"[mor] the stack recorded in {state} is not healthy: stopping its leftovers")
        down(state)
    ports = {
        "ray": ray_port or DEFAULT_PORTS["ray"],
        "dashboard": dashboard_port or DEFAULT_PORTS["dashboard"],
        "mlflow": mlflow_port or DEFAULT_PORTS["mlflow"],
    }
    _check_ports(host, ports)
    state.mkdir(parents=True, exist_ok=True)
    record = _new_record(state, host, ports)
    nodes = nodes or 1
    if nodes > 1 or cpus_per_node:
        record.ray.num_cpus = cpus_per_node or max(1, (os.cpu_count() or 1) // nodes)
    env = _stack_env(record)
    try:
        _start_mlflow(record, env)  # first: it warms up (~10-30 s) while `ray start` runs
        write_record(record)  # from here on `down` can find what was started
        _start_ray(record, env)
        write_record(record)
        _wait_healthy(record, timeout)
        _ensure_nodes(record, nodes, record.ray.num_cpus, timeout, env)
        record.status = "up"
        write_record(record)
    except BaseException:  # includes Ctrl-C: never leave half a stack running
        down(state)
        raise
    return record, True


def _ensure_nodes(
    record: StackRecord,
    target: int,
    cpus: int | None,
    timeout: float,
    env: dict[str, str] | None = None,
) -> None:
    """Extra nodes 1..target-1 running and registered with the head (``core.nodes``)."""
    ray = record.ray

    def start(node: RayNode) -> None:
        start_node(node, ray.address, record.host, ray.loopback_only, env or _stack_env(record))

    def save(nodes: list[RayNode]) -> None:
        record.nodes = nodes
        write_record(record)

    def make(index: int) -> RayNode:
        return new_node(record.id, index, cpus, Path(record.state_dir))

    try:
        started = ensure_nodes(record.nodes, target, make, start, save)
        wait_registered(ray.dashboard, started, timeout)
    except NodeStartError as exc:
        raise StackError(str(exc)) from None


def check_nodes(record: StackRecord, deep: bool = False) -> dict[str, ServiceHealth]:
    """Per extra node: its raylet alive and (deep) registered ALIVE with the head."""
    states: dict[str, str] = {}
    if deep and record.nodes:
        with contextlib.suppress(Exception):
            states = registered(record.ray.dashboard)
    out = {}
    for n in record.nodes:
        alive = n.alive()
        answers = alive and (states.get(n.resource) == "ALIVE" if deep else True)
        cpus = f"{n.num_cpus} CPU" if n.num_cpus is not None else "all CPUs"
        out[f"node {n.index}"] = ServiceHealth(
            n.raylet_pid, alive, answers, f"{n.resource}, {cpus}, {n.temp_dir}"
        )
    return out


# ----------------------------------------------------------------------------- down
def owned_processes(record: StackRecord) -> list[Any]:
    """Every live process the stack started: tagged, in Ray's session, or descended."""
    recorded = [(record.mlflow.pid, record.mlflow.create_time), *record.ray.pids.values()]
    sessions = [record.ray.session] + [n.session for n in record.nodes]
    recorded += [pid for n in record.nodes for pid in n.pids.values()]
    return owned(sessions, TAG_ENV, record.id, recorded)


def down(state_dir: str | Path | None = None, grace: float = 10.0) -> list[int]:
    """Stop every process the recorded stack started; returns their pids. No-op without one."""
    state = resolve_dir(state_dir)
    record = read_record(state)
    if record is None:
        return []
    stopped = stop(lambda: owned_processes(record), grace)
    if owned_processes(record):
        raise StackError(f"some stack processes survived SIGKILL; see {state / STACK_FILE}")
    for node in record.nodes:  # its Ray temp dir (sessions, sockets, logs) is ours alone
        shutil.rmtree(Path(node.temp_dir).parent, ignore_errors=True)
    (state / STACK_FILE).unlink(missing_ok=True)
    return sorted(stopped)
