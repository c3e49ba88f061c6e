"""One writer per run or sweep name: a lock file in its state folder on the storage path.

Two ``mor train`` of one name at once both attached to one MLflow run, logged its steps twice
and wrote the same Ray folder; two same-name sweeps overwrote each other's summary (issue 19).
The lock is a file created with ``O_CREAT | O_EXCL`` (atomic on local disks and NFS v3+), holding
the holder's host, pid and start time. A lock whose holder is a dead process on this host is
stale (a killed driver: a clean exit removes its lock) and is taken over; a holder on another
host cannot be checked from here, so the message says how to remove the lock by hand.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from mor.overrides import ConfigError

LOCK_FILE = "writer.lock"


class WriterLockError(ConfigError):
    """Another process is writing this run or sweep (a user error: exit 2)."""


def pid_alive(pid: int) -> bool:
    """Whether a process of this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_holder(lock: Path) -> dict | None:
    """The lock's holder ({host, pid, since}), or None when there is none or it is unreadable."""
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def is_stale(lock: Path, holder: dict | None) -> bool:
    """A holder that is a dead process on this host; or a lock left empty by a crash between
    create and write (given a few seconds, so that a writer mid-write is not mistaken)."""
    if holder is None:
        try:
            return time.time() - lock.stat().st_mtime > 5.0
        except FileNotFoundError:
            return True
    return holder.get("host") == socket.gethostname() and not pid_alive(holder["pid"])


def acquire(state_dir: Path, what: str) -> Path:
    """Take ``state_dir``'s writer lock for this process (again: a no-op); ``what`` names the
    run or sweep in the refusal. Returns the lock's path."""
    state_dir.mkdir(parents=True, exist_ok=True)
    lock = state_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = read_holder(lock)
            if holder is not None and {k: holder.get(k) for k in me} == me:
                return lock  # this process holds it already (plan_run, then run_training)
            if is_stale(lock, holder):
                lock.unlink(missing_ok=True)
                continue
            who = "an unreadable holder"
            if holder is not None:
                who = f"pid {holder['pid']} on {holder.get('host')} since {holder.get('since')}"
            raise WriterLockError(
                f"name: {what} is being written by {who} (lock {lock}); wait for it to end, "
                "use another name, or delete the lock if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(me | {"since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, f)
        return lock
    raise WriterLockError(f"name: could not take the writer lock {lock} for {what}")


def release(state_dir: Path) -> None:
    """Remove ``state_dir``'s lock if this process holds it."""
    lock = state_dir / LOCK_FILE
    holder = read_holder(lock)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        lock.unlink(missing_ok=True)


def stale_locks(parent: Path) -> list[Path]:
    """The stale writer locks of the state folders under ``parent`` (killed writers)."""
    return [lock for lock in parent.glob(f"*/{LOCK_FILE}") if is_stale(lock, read_holder(lock))]
