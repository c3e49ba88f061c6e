"""The local stack behind ``mor up|status|down``: a Ray head and an MLflow tracking server.

Both run as background services bound to 127.0.0.1 and are recorded in ``STATE/stack.json``
(STATE = ``--state-dir``, else $MOR_STACK_DIR, else ~/.mor/stack) with their PIDs, ports and
addresses; ``core/endpoints.py`` reads that record so that training, sweeps and
reports default to the stack while it is up.

Ownership: every process the stack starts carries ``MOR_STACK_ID=<uuid>`` in its environment
(children inherit it, including Ray workers and Ray Job drivers, which Ray starts in sessions
of their own), and ``ray start`` runs in a new session. ``mor down`` stops exactly the
processes with that tag, in that session, or descended from them: never ``ray stop``, which
would also stop Ray clusters that someone else started on this machine.

Ray's token authentication stays on: the head starts with ``RAY_AUTH_MODE=token`` (unless the
user set the variable) and a token is generated if none exists (``ray get-auth-token
--generate``, saved to ~/.ray/auth_token); ``enable_ray_token_auth`` makes this process's Ray
job clients send it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from core.endpoints import STACK_FILE, read_stack, stack_dir

TAG_ENV = "MOR_STACK_ID"
DEFAULT_PORTS = {"ray": 6379, "dashboard": 8265, "mlflow": 5000}
PORT_FLAGS = {"ray": "--ray-port", "dashboard": "--dashboard-port", "mlflow": "--mlflow-port"}
RAY_PROCESSES = ("gcs_server", "raylet", "dashboard")
# Popen handles of the servers this process started, so that `down` in the same process (the
# tests) can reap them instead of leaving zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


class StackError(RuntimeError):
    """The stack could not be started or stopped; the message says why and what to look at."""


class PortInUse(ValueError):
    """A requested port is taken by a process that is not ours (a usage error: exit 2)."""


# ----------------------------------------------------------------------------- helpers
def resolve_dir(state_dir: str | Path | None = None) -> Path:
    return Path(state_dir).expanduser().resolve() if state_dir else stack_dir().resolve()


def _write_record(state: Path, record: dict[str, Any]) -> None:
    tmp = state / (STACK_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2))
    tmp.replace(state / STACK_FILE)  # atomic: readers never see half a record


def port_free(host: str, port: int) -> bool:
    """True if nothing listens on (host, port); SO_REUSEADDR ignores TIME_WAIT leftovers."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A port nothing listens on now (ephemeral range: clear of Ray's worker ports)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def _same_process(pid: int | None, create_time: float | None) -> Any:
    """The psutil.Process for pid if it is still the process we recorded (no PID reuse)."""
    import psutil

    if not pid:
        return None
    try:
        p = psutil.Process(pid)
        if create_time is not None and abs(p.create_time() - create_time) > 1.0:
            return None
        return None if p.status() == psutil.STATUS_ZOMBIE else p
    except psutil.Error:
        return None


def _http(url: str, any_status: bool = False, timeout: float = 3.0) -> bool:
    """GET url answers 200 (or, with any_status, anything: Ray's 401 means it is up)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200 or any_status
    except urllib.error.HTTPError:
        return any_status
    except (urllib.error.URLError, OSError, ValueError):
        return False


def enable_ray_token_auth() -> bool:
    """Make Ray job clients in this process send the token, as ``ray.init`` does when it
    connects to an existing cluster: token mode if $RAY_AUTH_MODE is unset and a token exists.
    Returns whether token mode is on."""
    mode = os.environ.get("RAY_AUTH_MODE")
    if mode:
        return mode.lower() == "token"
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # a Ray without token authentication
        return False
    # Ray logs "... Set RAY_AUTH_MODE=disabled to opt out" here: advice we do not want to give.
    log = logging.getLogger(maybe_enable_token_auth_if_token_available.__module__)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        return bool(maybe_enable_token_auth_if_token_available(warn_if_disabled=False))
    finally:
        log.setLevel(level)


def _ray_jobs_answer(dashboard: str) -> bool:
    """The Ray job server lists jobs (authenticated): the check `mor sweep submit` relies on."""
    try:
        from ray.job_submission import JobSubmissionClient

        enable_ray_token_auth()
        JobSubmissionClient(dashboard).list_jobs()
        return True
    except Exception:
        return False


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def _console_script(name: str) -> str:
    """The ``ray``/``mlflow`` command of this Python environment (not whatever is on PATH)."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


# ----------------------------------------------------------------------------- health
def health(record: dict[str, Any] | None, deep: bool = True) -> dict[str, dict[str, Any]]:
    """Per service: pid alive (the recorded process, not a reused PID) and endpoint answers.
    ``deep`` checks Ray through an authenticated job-list call, else any HTTP answer."""
    out: dict[str, dict[str, Any]] = {}
    if not record:
        return out
    ray = record.get("ray") or {}
    pids = ray.get("pids") or {}
    alive = all(
        _same_process(*pids.get(n, (None, None))) is not None for n in ("gcs_server", "raylet")
    )
    dash = ray.get("dashboard")
    answers = (
        alive
        and bool(dash)
        and (_ray_jobs_answer(dash) if deep else _http(f"{dash}/api/version", any_status=True))
    )
    agent = ray.get("agent_port")
    if answers and deep and agent:  # jobs go through the head's agent: it must be serving
        answers = not port_free("0.0.0.0", agent)
    out["ray"] = {
        "pid": ray.get("pid"),
        "pid_alive": alive,
        "answers": answers,
        "healthy": alive and answers,
        "address": ray.get("address"),
        "dashboard": dash,
    }
    ml = record.get("mlflow") or {}
    alive = _same_process(ml.get("pid"), ml.get("create_time")) is not None
    answers = alive and _http(f"{ml.get('url')}/health")
    out["mlflow"] = {
        "pid": ml.get("pid"),
        "pid_alive": alive,
        "answers": answers,
        "healthy": alive and answers,
        "url": ml.get("url"),
    }
    return out


def is_healthy(report: dict[str, dict[str, Any]]) -> bool:
    return bool(report) and all(s["healthy"] for s in report.values())


def stack_addresses(state_dir: str | Path | None = None) -> dict[str, str]:
    """{"ray_dashboard", "ray_address", "mlflow"} of the stack when it is up and healthy,
    else {}. Cheap (no Ray import): pids alive and both HTTP endpoints answer."""
    record = read_stack(resolve_dir(state_dir))
    if not record or record.get("status") != "up":
        return {}
    if not is_healthy(health(record, deep=False)):
        return {}
    return {
        "ray_dashboard": record["ray"]["dashboard"],
        "ray_address": record["ray"]["address"],
        "mlflow": record["mlflow"]["url"],
    }


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
            [_console_script("ray"), "get-auth-token", "--generate"],
            stdout=subprocess.DEVNULL,
            stderr=err,
            env=env,
            timeout=120,
        ).returncode
    if rc != 0:
        raise StackError(f"could not find or generate a Ray auth token; see {log}")


def _start_mlflow(state: Path, host: str, port: int, env: dict[str, str]) -> subprocess.Popen:
    env = dict(env)
    # The server's job runner (GenAI scorers, a pool of huey consumers) is not used by the
    # platform and costs seconds and memory at start; telemetry would try the network.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    cmd = [
        _console_script("mlflow"), "server",
        "--backend-store-uri", f"sqlite:///{state / 'mlflow.db'}",
        # Artifacts go through the server (mlflow-artifacts:/ URIs), so clients never need
        # the server's disk: the same setup as a team server with S3 (platform/mlflow).
        "--serve-artifacts", "--artifacts-destination", (state / "mlartifacts").as_uri(),
        "--host", host, "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    with open(state / "mlflow.log", "ab") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            stdin=subprocess.DEVNULL, cwd=state,
        )  # fmt: skip
    _CHILDREN[proc.pid] = proc
    return proc


def _start_ray(
    state: Path, host: str, ports: dict[str, int], aux: dict[str, int], env: dict[str, str]
) -> int:
    """Run ``ray start --head`` in a new session; returns the session id (its pid)."""
    cmd = [
        _console_script("ray"), "start", "--head",
        f"--node-ip-address={host}", f"--port={ports['ray']}",
        f"--dashboard-host={host}", f"--dashboard-port={ports['dashboard']}",
        # Ray's fixed defaults (agent 52365, client server 10001) collide with any other Ray
        # on the machine; a head whose agent cannot bind accepts no job ("No available agent").
        f"--dashboard-agent-listen-port={aux['agent']}",
        f"--ray-client-server-port={aux['client']}",
        "--include-dashboard=true", "--disable-usage-stats",
    ]  # fmt: skip
    log = state / "ray-start.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            rc = proc.wait(timeout=300)
        except subprocess.TimeoutExpired:
            rc = None
    if rc != 0:
        raise StackError(f"`ray start` failed (exit {rc}); its log {log}:\n{_tail(log)}")
    return proc.pid


def _ray_pids(session: int) -> dict[str, list[float]]:
    """[pid, create_time] of the head's gcs_server, raylet and dashboard in our session."""
    import psutil

    found: dict[str, list[float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        try:
            if os.getsid(p.pid) != session:
                continue
        except OSError:
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        name = p.info["name"] or ""
        for key in RAY_PROCESSES:
            if key not in found and (name == key or f"/{key}.py" in cmdline):
                found[key] = [p.pid, p.info["create_time"]]
    return found


def up(
    state_dir: str | Path | None = None,
    host: str = "127.0.0.1",
    ray_port: int | None = None,
    dashboard_port: int | None = None,
    mlflow_port: int | None = None,
    timeout: float = 240.0,
) -> tuple[dict[str, Any], bool]:
    """Start the stack (or find it running); returns (record, started_now)."""
    state = resolve_dir(state_dir)
    record = read_stack(state)
    if record and record.get("status") == "up" and is_healthy(health(record)):
        return record, False
    if record:  # stale or half-started: clear what is left of it first
        print(f"[mor] the stack recorded in {state} is not healthy: stopping its leftovers")
        down(state)
    ports = {
        "ray": ray_port or DEFAULT_PORTS["ray"],
        "dashboard": dashboard_port or DEFAULT_PORTS["dashboard"],
        "mlflow": mlflow_port or DEFAULT_PORTS["mlflow"],
    }
    for key, port in ports.items():
        # Ray's GCS listens on every interface whatever --node-ip-address says.
        if not port_free("0.0.0.0" if key == "ray" else host, port):
            raise PortInUse(
                f"{PORT_FLAGS[key]}: port {port} is already in use by another process "
                f"(not this stack); choose a free one, e.g. `mor up {PORT_FLAGS[key]} "
                f"{port + 1}`"
            )
    if len(set(ports.values())) != len(ports):
        raise PortInUse(f"--ray-port, --dashboard-port, --mlflow-port must differ: {ports}")
    aux = {"agent": free_port(), "client": free_port()}
    state.mkdir(parents=True, exist_ok=True)
    stack_id = uuid.uuid4().hex
    env = dict(os.environ)
    env[TAG_ENV] = stack_id
    env["MOR_STACK_DIR"] = str(state)  # jobs on this head find the stack (its MLflow) too
    _ensure_ray_token(env, state / "ray-start.log")
    url_host = f"[{host}]" if ":" in host else host
    record = {
        "version": 1,
        "status": "starting",
        "id": stack_id,
        "state_dir": str(state),
        "host": host,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ray": {
            "port": ports["ray"],
            "dashboard_port": ports["dashboard"],
            "address": f"{url_host}:{ports['ray']}",
            "dashboard": f"http://{url_host}:{ports['dashboard']}",
            "agent_port": aux["agent"],
            "client_server_port": aux["client"],
            "log": str(state / "ray-start.log"),
        },
        "mlflow": {
            "port": ports["mlflow"],
            "url": f"http://{url_host}:{ports['mlflow']}",
            "backend_store_uri": f"sqlite:///{state / 'mlflow.db'}",
            "artifacts_destination": (state / "mlartifacts").as_uri(),
            "log": str(state / "mlflow.log"),
        },
    }
    try:
        # MLflow first: it warms up (~10-30 s) while `ray start` runs.
        ml = _start_mlflow(state, host, ports["mlflow"], env)
        import psutil

        record["mlflow"].update(
            pid=ml.pid, pgid=ml.pid, create_time=psutil.Process(ml.pid).create_time()
        )
        _write_record(state, record)  # from here on `mor down` can find what was started
        session = _start_ray(state, host, ports, aux, env)
        pids = _ray_pids(session)
        gcs = pids.get("gcs_server", [None])[0]
        record["ray"].update(session=session, pid=gcs, pids=pids)
        _write_record(state, record)
        deadline = time.time() + timeout
        while not is_healthy(report := health(record)):
            dead = [k for k, s in report.items() if not s["pid_alive"]]
            if dead or time.time() > deadline:
                why = f"{', '.join(dead)} exited" if dead else f"not answering after {timeout}s"
                logs = "\n".join(
                    f"--- {record[k]['log']}\n{_tail(Path(record[k]['log']))}" for k in report
                )
                raise StackError(f"the stack did not start ({why}):\n{logs}")
            time.sleep(1.0)
        record["status"] = "up"
        _write_record(state, record)
    except BaseException:  # includes Ctrl-C: never leave half a stack running
        down(state)
        raise
    return record, True


# ----------------------------------------------------------------------------- down
def owned_processes(record: dict[str, Any]) -> list[Any]:
    """Every live process the stack started: tagged, in Ray's session, or descended."""
    import psutil

    stack_id = record.get("id")
    session = (record.get("ray") or {}).get("session")
    roots: dict[int, Any] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            ours = session is not None and os.getsid(p.pid) == session
            if not ours and stack_id:
                ours = p.environ().get(TAG_ENV) == stack_id
        except (psutil.Error, OSError):
            continue
        if ours:
            roots[p.pid] = p
    ml = record.get("mlflow") or {}
    recorded = [(ml.get("pid"), ml.get("create_time"))]
    recorded += list(((record.get("ray") or {}).get("pids") or {}).values())
    for pid, ctime in recorded:
        if (p := _same_process(pid, ctime)) is not None:
            roots[p.pid] = p
    found = dict(roots)
    for p in roots.values():
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    found.pop(me, None)
    return [p for p in found.values() if _alive(p)]


def _alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _reap(pids: list[int]) -> None:
    """Collect the exit status of our own children (no zombies left behind by the tests)."""
    for pid in pids:
        proc = _CHILDREN.pop(pid, None)
        try:
            if proc is not None:
                proc.wait(timeout=5)
            else:
                os.waitpid(pid, os.WNOHANG)
        except (ChildProcessError, subprocess.TimeoutExpired, OSError):
            pass


def _signal_all(procs: list[Any], sig: int) -> None:
    import psutil

    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)


def down(state_dir: str | Path | None = None, grace: float = 10.0) -> list[int]:
    """Stop every process the recorded stack started; returns their pids. No-op without one."""
    state = resolve_dir(state_dir)
    record = read_stack(state)
    if record is None:
        return []
    stopped: set[int] = set()
    # Rounds: Ray may start a worker while its siblings are being stopped.
    for _ in range(4):
        procs = owned_processes(record)
        if not procs:
            break
        stopped.update(p.pid for p in procs)
        _signal_all(procs, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(_alive(p) for p in procs):
            _reap([p.pid for p in procs if not _alive(p)])
            time.sleep(0.2)
        _signal_all([p for p in procs if _alive(p)], signal.SIGKILL)
        time.sleep(0.2)
        _reap([p.pid for p in procs])
    if owned_processes(record):
        raise StackError(f"some stack processes survived SIGKILL; see {state / STACK_FILE}")
    (state / STACK_FILE).unlink(missing_ok=True)
    return sorted(stopped)
