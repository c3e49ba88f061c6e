"""Processes and ports of the local stack (``core.stack``): free ports, which processes belong
to it (a session, an environment tag, recorded pids with their start times) and stopping
them: SIGTERM, then SIGKILL, in rounds, reaping our own children.

Only psutil and the standard library: nothing here knows about Ray or MLflow.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

# Popen handles of the servers this process started, so that `down` in the same process (the
# tests) can reap them instead of leaving zombies.
_CHILDREN: dict[int, subprocess.Popen] = {}


def adopt(proc: subprocess.Popen) -> None:
    """Remember a server this process started, to reap it when it is stopped."""
    _CHILDREN[proc.pid] = proc


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


def same_process(pid: int | None, create_time: float | None) -> Any:
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


def alive(p: Any) -> bool:
    import psutil

    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def owned(
    sessions: int | Iterable[int | None] | None,
    tag_env: str | None,
    tag: str | None,
    recorded: Iterable[tuple[int | None, float | None]],
) -> list[Any]:
    """Every live process in one of ``sessions``, or with ``tag_env=tag`` in its environment
    (unless None), or recorded as (pid, create_time), and all their descendants; never this
    process."""
    import psutil

    wanted = {sessions} if isinstance(sessions, int) else set(sessions or ())
    wanted.discard(None)
    roots: dict[int, Any] = {}
    me = os.getpid()
    for p in psutil.process_iter(["pid"]):
        if p.pid == me:
            continue
        try:
            ours = bool(wanted) and os.getsid(p.pid) in wanted
            if not ours and tag_env:
                ours = p.environ().get(tag_env) == tag
        except (psutil.Error, OSError):
            continue
        if ours:
            roots[p.pid] = p
    for pid, ctime in recorded:
        if (p := same_process(pid, ctime)) is not None:
            roots[p.pid] = p
    found = dict(roots)
    for p in roots.values():
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    found.pop(me, None)
    return [p for p in found.values() if alive(p)]


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


def stop(find: Callable[[], list[Any]], grace: float = 10.0, rounds: int = 4) -> set[int]:
    """Stop what ``find`` returns: SIGTERM, SIGKILL after ``grace`` seconds; returns the pids.
    Rounds: Ray may start a worker while its siblings are being stopped."""
    stopped: set[int] = set()
    for _ in range(rounds):
        procs = find()
        if not procs:
            break
        stopped.update(p.pid for p in procs)
        _signal_all(procs, signal.SIGTERM)
        deadline = time.time() + grace
        while time.time() < deadline and any(alive(p) for p in procs):
            _reap([p.pid for p in procs if not alive(p)])
            time.sleep(0.2)
        _signal_all([p for p in procs if alive(p)], signal.SIGKILL)
        time.sleep(0.2)
        _reap([p.pid for p in procs])
    return stopped


def session_pids(session: int, names: Iterable[str]) -> dict[str, tuple[int, float]]:
    """(pid, create_time) of the first process in ``session`` named each of ``names`` (an
    executable's name, or a ``/<name>.py`` script on its command line)."""
    import psutil

    found: dict[str, tuple[int, float]] = {}
    for p in psutil.process_iter(["pid", "name", "cmdline", "create_time"]):
        try:
            if os.getsid(p.pid) != session:
                continue
        except OSError:
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        name = p.info["name"] or ""
        for key in names:
            if key not in found and (name == key or f"/{key}.py" in cmdline):
                found[key] = (p.pid, p.info["create_time"])
    return found


def tail(path: str | Path, n: int = 40) -> str:
    """The last ``n`` lines of a log, for an error message."""
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def console_script(name: str) -> str:
    """A console script (``ray``, ``mlflow``) of this Python environment, not whatever is on
    PATH."""
    here = Path(sys.executable).parent / name
    return str(here) if here.exists() else (shutil.which(name) or name)


def run_in_new_session(
    cmd: list[str], log: str | Path, env: dict[str, str], timeout: float = 300.0
) -> tuple[int, int | None]:
    """Run a daemonising command (``ray start``) in its own session, output appended to
    ``log``; (its pid, which is also the session id of what it leaves running; its exit code,
    None when it did not exit within ``timeout``)."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            return proc.pid, proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return proc.pid, None
