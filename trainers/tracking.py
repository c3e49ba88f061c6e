"""MLflow tracking for training runs: one run per training run, resumed on rerun.

The driver creates (or finds) the run and logs the resolved config as params; rank 0 logs
metrics per optimizer step. A resumed run may re-execute steps after its last checkpoint that
were already logged: ``StepMetricLogger`` skips steps at or below the last logged step, so each
metric's step sequence has no repeats (and, since training continues from the checkpoint, no
gaps).
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from core.endpoints import check_mlflow_reachable, redact
from core.keys import TAG_INTERRUPTED, TAG_RUN_NAME
from core.storage import Location
from mor.overrides import ConfigError
from trainers.writer_lock import is_stale, read_holder, stale_locks

PARAM_MAX = 500  # MLflow's limit on a param value's length
RUN_ID_FILE = "mlflow_run_id.json"
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"a.b.c": "value"}; credentials redacted, values cut to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = redact(text)[:PARAM_MAX]
    return out


def is_secret_key(key: str) -> bool:
    upper = key.upper().replace(".", "_")
    return any(m in upper for m in SECRET_MARKERS) and not upper.endswith("TOKENIZER")


def connect(
    uri: str, experiment: str, artifact_root: str | None = None
) -> tuple[MlflowClient, str]:
    """Client plus experiment id; a tracking server that does not answer is a clear error."""
    if uri.startswith("sqlite:///"):
        Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    check_reachable(uri)
    try:
        with _sqlite_creation_lock(uri):
            client = MlflowClient(tracking_uri=uri)
            return client, _experiment_id(client, uri, experiment, artifact_root)
    except MlflowException as exc:
        msg = f"tracking.uri: MLflow at {uri!r} is not usable: {exc}"
        raise ConfigError(redact(msg)) from None
    except Exception as exc:  # connection errors surface as requests/urllib3 exceptions
        raise ConfigError(redact(f"tracking.uri: cannot reach MLflow at {uri!r}: {exc}")) from None


@contextmanager
def _sqlite_creation_lock(uri: str) -> Iterator[None]:
    """Two first runs at once raced creating a sqlite store's schema (alembic CommandError):
    the first access of a sqlite store is serialised by an flock next to the database."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    with open(db.with_name(db.name + ".init-lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _experiment_id(
    client: MlflowClient, uri: str, experiment: str, artifact_root: str | None
) -> str:
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    if artifact_root is None and uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        artifact_root = (db.parent / "mlartifacts" / experiment).as_uri()
    return client.create_experiment(experiment, artifact_location=artifact_root)


def find_or_create_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    home: Location,
    params: Mapping[str, str],
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Return (run_id, resumed). The run id is remembered in ``home`` (the run's persisted
    folder, local or in an object store) for reruns."""
    marker = home.child(RUN_ID_FILE)
    if marker.is_file():
        saved = marker.read_json()
        try:
            run = client.get_run(saved["run_id"])
            if run.info.lifecycle_stage == "active":
                if run.info.status == "RUNNING":  # the caller holds the writer lock: its last
                    mark_interrupted_run(client, run.info.run_id)  # writer was killed
                    run = client.get_run(run.info.run_id)
                if run.info.status != "FINISHED":  # a finished run stays finished
                    client.update_run(run.info.run_id, status="RUNNING")
                    if TAG_INTERRUPTED in run.data.tags:  # it goes on: no longer interrupted
                        client.delete_tag(run.info.run_id, TAG_INTERRUPTED)
                return run.info.run_id, True
        except MlflowException:
            pass
    # ``tags`` may give a display name (mlflow.runName); the internal name stays searchable.
    all_tags = {"mlflow.runName": run_name, TAG_RUN_NAME: run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=all_tags["mlflow.runName"], tags=all_tags)
    run_id = run.info.run_id
    safe = {k: v for k, v in params.items() if not is_secret_key(k)}
    items = [Param(k, v) for k, v in sorted(safe.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    marker.write_json({"run_id": run_id, "experiment_id": experiment_id})
    return run_id, False


def mark_interrupted_run(client: MlflowClient, run_id: str) -> None:
    """A run left RUNNING by a killed process: KILLED, with the tag saying so."""
    client.set_tag(run_id, TAG_INTERRUPTED, "true")
    client.set_terminated(run_id, status="KILLED")


def mark_killed_writers(client: MlflowClient, parent: Path) -> list[str]:
    """The runs of the state folders under ``parent`` whose writer was killed (a stale writer
    lock) and that MLflow still shows RUNNING become KILLED; their stale locks are removed."""
    marked = []
    for lock in stale_locks(parent):
        try:
            run_id = json.loads((lock.parent / RUN_ID_FILE).read_text())["run_id"]
            if client.get_run(run_id).info.status == "RUNNING":
                mark_interrupted_run(client, run_id)
                marked.append(run_id)
        except (OSError, ValueError, KeyError, MlflowException):
            pass  # another tracking store, or no run yet: nothing to mark
        if is_stale(lock, read_holder(lock)):  # again: a new writer may have taken it over
            lock.unlink(missing_ok=True)
    return marked


class StepMetricLogger:
    """Logs {name: value} per step; never logs a step twice for the same run, never drops one.

    When the tracking server is unreachable, training goes on: metrics wait in memory and in a
    spool file (JSON lines, in the run's state folder), and are sent once the server answers
    again, at the latest at the end of the run (then by the driver, ``sync_spool``).
    """

    RETRY_AFTER_S = 5.0

    def __init__(self, uri: str, run_id: str, spool: Location | None = None) -> None:
        # Fail fast instead of MLflow's minutes of retries: the spool keeps what failed.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.spool = spool
        self._pending: list[Metric] = _read_spool(spool)
        self._spooled = bool(self._pending)  # a spool exists (no storage request per step)
        self.last_step = max([self._last_logged_step(), *(m.step for m in self._pending)])
        self._retry_at = 0.0
        self._down = False

    def _last_logged_step(self) -> int:
        try:
            hist = self.client.get_metric_history(self.run_id, "train/loss")
        except Exception:
            return 0
        return max((m.step for m in hist), default=0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.last_step:
            return
        self.last_step = step
        ts = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self.flush()

    def flush(self, force: bool = False) -> bool:
        """Send pending metrics; True when nothing is left pending."""
        if not self._pending:
            return True
        if not force and time.time() < self._retry_at:
            self._write_spool()
            return False
        try:
            while self._pending:
                chunk = self._pending[:500]
                self.client.log_batch(self.run_id, metrics=chunk)
                del self._pending[: len(chunk)]
            if self._down:
                print("[mlflow] tracking server is back: pending metrics sent")
            self._down = False
            if self.spool is not None and self._spooled:
                self.spool.delete()
                self._spooled = False
            return True
        except Exception as exc:  # the server is down: keep training, keep the metrics
            if not self._down:
                print(f"[mlflow] tracking server unreachable, spooling metrics: {exc}")
            self._down = True
            self._retry_at = time.time() + self.RETRY_AFTER_S
            self._write_spool()
            return False

    def close(self, wait_s: float = 30.0) -> bool:
        """Final flush, retrying for up to ``wait_s``; what is left stays in the spool."""
        deadline = time.time() + wait_s
        while not self.flush(force=True):
            if time.time() > deadline:
                print(f"[mlflow] {len(self._pending)} metric values remain in {self.spool}")
                return False
            time.sleep(1.0)
        return True

    def _write_spool(self) -> None:
        if self.spool is None:
            return
        self.spool.write_text(  # atomic on both kinds of storage
            "".join(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n" for m in self._pending)
        )
        self._spooled = True

    def set_tag(self, key: str, value: str) -> None:
        try:
            self.client.log_batch(self.run_id, tags=[RunTag(key, value)])
        except Exception as exc:
            print(f"[mlflow] tag {key} not set: {exc}")


def _read_spool(spool: Location | None) -> list[Metric]:
    if spool is None or not spool.is_file():
        return []
    out = []
    for line in spool.read_text().splitlines():
        if line.strip():
            key, value, ts, step = json.loads(line)
            out.append(Metric(key, value, ts, step))
    return out


def sync_spool(uri: str, run_id: str, spool: Location) -> int:
    """Send a spool left by a worker (driver side, after training); returns values sent."""
    pending = _read_spool(spool)
    if not pending:
        return 0
    client = MlflowClient(tracking_uri=uri)
    for i in range(0, len(pending), 500):
        client.log_batch(run_id, metrics=pending[i : i + 500])
    spool.delete()
    return len(pending)


def check_reachable(uri: str) -> None:
    """The tracking server answers, or a ``ConfigError`` naming ``tracking.uri`` and the fix."""
    try:
        check_mlflow_reachable(uri)
    except ConnectionError as exc:
        raise ConfigError(
            f"tracking.uri: {exc}; start it (`mor up` starts one) or set tracking.uri / "
            "MLFLOW_TRACKING_URI"
        ) from None
