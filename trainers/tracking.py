"""MLflow tracking for training runs: one run per training run, resumed on rerun.

The driver creates (or finds) the run and logs the resolved config as params; rank 0 logs
metrics per optimizer step. A resumed run may re-execute steps after its last checkpoint that
were already logged: ``StepMetricLogger`` skips steps at or below the last logged step, so each
metric's step sequence has no repeats (and, since training continues from the checkpoint, no
gaps).
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from mor.overrides import ConfigError

PARAM_MAX = 500  # MLflow's limit on a param value's length
RUN_ID_FILE = "mlflow_run_id.json"
SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "KEY", "CREDENTIAL")


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested config → {"a.b.c": "value"}; long values truncated to MLflow's limit."""
    out: dict[str, str] = {}
    for k, v in data.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            text = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
            out[key] = text[:PARAM_MAX]
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
    client = MlflowClient(tracking_uri=uri)
    try:
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            return client, exp.experiment_id
        if artifact_root is None and uri.startswith("sqlite:///"):
            db = Path(uri[len("sqlite:///") :])
            artifact_root = (db.parent / "mlartifacts" / experiment).as_uri()
        return client, client.create_experiment(experiment, artifact_location=artifact_root)
    except MlflowException as exc:
        raise ConfigError(f"tracking.uri: MLflow at {uri!r} is not usable: {exc}") from None
    except Exception as exc:  # connection errors surface as requests/urllib3 exceptions
        raise ConfigError(f"tracking.uri: cannot reach MLflow at {uri!r}: {exc}") from None


def find_or_create_run(
    client: MlflowClient,
    experiment_id: str,
    run_name: str,
    state_dir: Path,
    params: Mapping[str, str],
    parent_run_id: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> tuple[str, bool]:
    """Return (run_id, resumed). The run id is remembered in ``state_dir`` for reruns."""
    marker = state_dir / RUN_ID_FILE
    if marker.is_file():
        saved = json.loads(marker.read_text())
        try:
            run = client.get_run(saved["run_id"])
            if run.info.lifecycle_stage == "active":
                client.update_run(run.info.run_id, status="RUNNING")
                return run.info.run_id, True
        except MlflowException:
            pass
    all_tags = {"mlflow.runName": run_name, **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    safe = {k: v for k, v in params.items() if not is_secret_key(k)}
    items = [Param(k, v) for k, v in sorted(safe.items())]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100])
    state_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"run_id": run_id, "experiment_id": experiment_id}))
    return run_id, False


class StepMetricLogger:
    """Logs {name: value} per step; never logs a step twice for the same run."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.client = MlflowClient(tracking_uri=uri)
        self.run_id = run_id
        self.last_step = self._last_logged_step()
        self._pending: list[Metric] = []

    def _last_logged_step(self) -> int:
        try:
            hist = self.client.get_metric_history(self.run_id, "train/loss")
        except MlflowException:
            return 0
        return max((m.step for m in hist), default=0)

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        if step <= self.last_step:
            return
        ts = int(time.time() * 1000)
        self._pending.extend(Metric(k, float(v), ts, step) for k, v in metrics.items())
        self.flush()

    def flush(self) -> None:
        """Send pending metrics; on a transient failure keep them for the next call."""
        if not self._pending:
            return
        try:
            for i in range(0, len(self._pending), 500):
                self.client.log_batch(self.run_id, metrics=self._pending[i : i + 500])
            self._pending.clear()
        except Exception as exc:  # the server may be briefly down; training goes on
            print(f"[mlflow] metrics kept for retry ({len(self._pending)} pending): {exc}")

    def set_tag(self, key: str, value: str) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(key, value)])
