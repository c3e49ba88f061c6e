"""Where a command finds Ray and MLflow: one resolution for train, eval, sweeps and reports.

``resolve_endpoints`` is the only place that decides; each setting follows the same order:
an explicit value (a flag, a config field) > an environment variable > the `mor up` stack
while it is healthy (``core.stack.healthy_stack``) > a local default. Never Ray's own
auto-detection, which would reattach to a cluster recorded in /tmp/ray even after it died.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from core.stack import RAY_LOCAL_ONLY_ENV, StackRecord, healthy_stack, is_loopback
from core.storage import is_uri
from mor.overrides import ConfigError

Target = Literal["ray", "jobs"]


@dataclass(frozen=True)
class Endpoints:
    ray_address: str
    """For ``ray.init``: explicit, else $RAY_ADDRESS, else the stack's head, else "local"
    (a fresh Ray for this process)."""
    job_server: str | None
    """For Ray Job submission: explicit, else $RAY_API_SERVER_ADDRESS, else (for
    target="jobs") the stack's dashboard, else None."""
    tracking_uri: str
    """MLflow: explicit, else the run's recorded one, else $MLFLOW_TRACKING_URI, else the
    stack's server, else an absolute sqlite store under the storage path."""
    ray_token_auth: bool
    """Token authentication is on for this process's Ray clients."""


def enable_ray_token_auth() -> bool:
    """Make Ray clients in this process (``ray.init`` to an existing cluster, job clients)
    send the token: token mode if $RAY_AUTH_MODE is unset and a token exists (the stack's
    head requires it; ``ray.init(address=...)`` does not turn it on by itself). Returns
    whether token mode is on."""
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


def _same_server(a: str, b: str) -> bool:
    return a.rstrip("/") == b.rstrip("/")


def use_ray_single_machine_mode() -> None:
    """Connect this process's Ray driver the way the loopback-only stack's head runs: in
    Ray's single-machine mode its node address is 127.0.0.1, as the head's is. Otherwise Ray
    rewrites a 127.0.0.1 GCS address to the host's address, where nothing listens, and binds
    the driver's own gRPC server to every interface. Ray reads the switch when it is imported
    (``ray._private.ray_constants``), which may already have happened in this process."""
    os.environ[RAY_LOCAL_ONLY_ENV] = "0"
    import ray._private.ray_constants as ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def _loopback_stack_gcs(address: str, stack: Callable[[], StackRecord | None]) -> bool:
    """``address`` names the GCS of a loopback-only stack (by any loopback name)."""
    host, _, port = address.split("://", 1)[-1].rpartition(":")
    if not is_loopback(host.strip("[]")) or (s := stack()) is None:
        return False
    return s.ray.loopback_only and port == s.ray.address.rpartition(":")[2]


def resolve_endpoints(
    *,
    ray_address: str | None = None,
    job_server: str | None = None,
    tracking_uri: str | None = None,
    recorded: str | None = None,
    storage_path: str | Path = "outputs",
    target: Target | None = "ray",
) -> Endpoints:
    """Ray address, job server, Ray auth and MLflow URI for one command.

    ``target`` is what the command connects to: "ray" (``ray.init``: train, sweep run),
    "jobs" (the job server: sweep submit/status/logs/stop) or None (MLflow only: report,
    eval). Token auth is enabled in this process when it connects to an existing cluster
    (not a fresh local Ray). A job server other than the stack's is a foreign cluster: the
    stack's MLflow (on this machine's loopback) is then no default for its jobs.
    ``recorded`` is the tracking URI an export recorded: its eval lands beside its training.
    """
    stack = functools.cache(healthy_stack)  # looked up at most once, only when needed
    s: StackRecord | None
    ray = ray_address or os.environ.get("RAY_ADDRESS")
    if not ray:
        ray = s.ray.address if (s := stack()) else "local"
    jobs = job_server or os.environ.get("RAY_API_SERVER_ADDRESS")
    if not jobs and target == "jobs":
        jobs = s.ray.dashboard if (s := stack()) else None
    uri = tracking_uri or recorded or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and (s := stack()) is not None:
        foreign = target == "jobs" and jobs is not None
        if not (foreign and not _same_server(jobs, s.ray.dashboard)):
            uri = s.mlflow.url
    if not uri and is_uri(storage_path):  # sqlite needs a local file, which other nodes lack
        raise ConfigError(
            f"tracking.uri: storage_path {storage_path} is an object store, and MLflow's default "
            "store is a sqlite file beside a local storage path; give a tracking server "
            "(tracking.uri, $MLFLOW_TRACKING_URI, or start the `mor up` stack)"
        )
    if not uri:  # absolute: a submitted job runs in another working directory
        uri = f"sqlite:///{os.path.abspath(os.path.expanduser(storage_path))}/mlflow.db"
    if target == "ray" and _loopback_stack_gcs(ray, stack):
        use_ray_single_machine_mode()
    auth = target == "jobs" or (target == "ray" and ray != "local")
    return Endpoints(
        ray_address=ray,
        job_server=jobs,
        tracking_uri=uri,
        ray_token_auth=enable_ray_token_auth() if auth else False,
    )


def resolve_tracking_uri(
    explicit: str | None, storage_path: str | Path, recorded: str | None = None
) -> str:
    """The MLflow URI of ``resolve_endpoints`` alone (no Ray): an explicit one, else the one
    ``recorded`` where the run came from, else $MLFLOW_TRACKING_URI, else the healthy stack's
    server, else an absolute sqlite store under ``storage_path``."""
    return resolve_endpoints(
        tracking_uri=explicit, recorded=recorded, storage_path=storage_path, target=None
    ).tracking_uri


_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][\w+.-]*://)[^/@\s]+@")


def strip_credentials(text: str) -> str:
    """``scheme://user:password@host/...`` → ``scheme://host/...`` in every URL of ``text``: a
    URI safe to record in an export and still usable. Credentials travel as
    MLFLOW_TRACKING_USERNAME/PASSWORD instead."""
    return _USERINFO.sub(r"\g<scheme>", text)


def redact(text: str) -> str:
    """``scheme://user:password@host`` → ``scheme://***@host`` in every URL of ``text``: for
    params, logs and error messages, where a reader should see that credentials were given."""
    return _USERINFO.sub(r"\g<scheme>***@", text)


def check_mlflow_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """An http(s) tracking URI must answer now: a clear ``ConnectionError`` in seconds instead
    of MLflow's minutes of retries. Other stores (sqlite, file) need no server."""
    if not uri.startswith(("http://", "https://")):
        return
    import urllib.error
    import urllib.request

    # Without user:password@: urllib would take it for part of the host name, and /health
    # needs no login (a 401 still proves the server answers).
    try:
        with urllib.request.urlopen(
            strip_credentials(uri).rstrip("/") + "/health", timeout=timeout_s
        ):
            return
    except urllib.error.HTTPError:
        return  # it answered (a proxy may not serve /health): reachable
    except Exception as exc:
        raise ConnectionError(
            f"the MLflow server at {strip_credentials(uri)} does not answer ({redact(str(exc))})"
        ) from None


def check_ray_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Something must listen at a ``host:port`` Ray address now: ``ray.init`` would retry an
    unreachable GCS for minutes. "local"/"auto" start or find a Ray themselves."""
    if address in ("local", "auto"):
        return
    host, _, port = address.split("://", 1)[-1].rstrip("/").rpartition(":")
    if not port.isdigit():
        return  # not host:port: let Ray parse (and reject) it
    try:
        socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout_s).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {address} ({exc})") from None
