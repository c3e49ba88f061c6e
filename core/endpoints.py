"""Defaults from the local ``mor up`` stack: its MLflow URL and Ray address, when it is up.

Pure standard library on purpose: ``trainers`` and ``sweeps`` read the stack's record
(``STATE/stack.json``, written by ``cli/stack.py``) without depending on the CLI or on
``psutil``. "Up" here means only that the recorded process is alive; ``mor status`` does the
real health check. The precedence everywhere is: explicit setting > environment variable
(``MLFLOW_TRACKING_URI``, ``RAY_ADDRESS``) > the stack > the built-in local default.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

STACK_DIR_ENV = "MOR_STACK_DIR"
STACK_FILE = "stack.json"


def stack_dir() -> Path:
    """Where the stack keeps its state: $MOR_STACK_DIR, else ~/.mor/stack."""
    raw = os.environ.get(STACK_DIR_ENV)
    return Path(raw).expanduser() if raw else Path.home() / ".mor" / "stack"


def read_stack(state_dir: str | Path | None = None) -> dict[str, Any] | None:
    """The stack's record, or None when there is none (or it cannot be read)."""
    path = Path(state_dir).expanduser() if state_dir else stack_dir()
    try:
        data = json.loads((path / STACK_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def pid_alive(pid: Any) -> bool:
    """True if ``pid`` names a running (not zombie) process."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    try:  # a zombie still answers kill(0); on Linux /proc tells them apart
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _service(name: str, state_dir: str | Path | None) -> dict[str, Any] | None:
    data = read_stack(state_dir)
    if not data or data.get("status") != "up":
        return None
    svc = data.get(name) or {}
    return svc if pid_alive(svc.get("pid")) else None


def stack_mlflow_uri(state_dir: str | Path | None = None) -> str | None:
    """The stack's MLflow tracking URL if its server is alive, else None."""
    svc = _service("mlflow", state_dir)
    return svc.get("url") if svc else None


def stack_ray_address(state_dir: str | Path | None = None) -> str | None:
    """The stack's Ray GCS address (for ``ray.init``) if its head is alive, else None."""
    svc = _service("ray", state_dir)
    return svc.get("address") if svc else None


def default_ray_address() -> str | None:
    """Ray address for a command given none: None when $RAY_ADDRESS is set (Ray reads it,
    e.g. inside a Ray Job), else the stack's head if it is up, else None (local Ray)."""
    if os.environ.get("RAY_ADDRESS"):
        return None
    return stack_ray_address()


def ray_init_address(explicit: str | None = None) -> str | None:
    """What to pass to ``ray.init``: never Ray's own auto-detection, which would reattach to a
    cluster recorded in /tmp/ray even after it died. An explicit address wins, then
    $RAY_ADDRESS (None: Ray reads it), then the `mor up` stack, else a fresh local Ray."""
    if explicit:
        return explicit
    if os.environ.get("RAY_ADDRESS"):
        return None
    return stack_ray_address() or "local"


def strip_credentials(uri: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://host/...``: a URI safe to record in an
    export or a param. Credentials travel as MLFLOW_TRACKING_USERNAME/PASSWORD instead."""
    return re.sub(r"^(?P<scheme>[A-Za-z][\w+.-]*://)[^/@\s]+@", r"\g<scheme>", uri)


def resolve_tracking_uri(
    explicit: str | None, storage_path: str | Path, recorded: str | None = None
) -> str:
    """The MLflow URI a command uses: an explicit one, else the one ``recorded`` where the
    run came from (an export's training run: its eval must land beside it), else
    $MLFLOW_TRACKING_URI, else the `mor up` stack's server while it is up, else a sqlite
    store under ``storage_path``."""
    if explicit:
        return explicit
    if recorded:
        return recorded
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return stack_mlflow_uri() or f"sqlite:///{Path(storage_path) / 'mlflow.db'}"
