"""Submit a sweep to a Ray cluster as a Ray Job, and follow it (status, logs, stop).

The spec is validated here, before anything reaches the cluster, then travels as JSON in the
job's environment; the project travels as the job's ``working_dir``. Relative storage paths and
sqlite tracking URIs are made absolute first, so a local head writes where the user expects
(on a real cluster, use a shared path or object store and an MLflow server).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sweeps.spec import SweepSpec, validate_spec

SPEC_ENV = "MOR_SWEEP_SPEC"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
UPLOAD_EXCLUDES = [
    "outputs/",
    ".git/",
    "*.db",
    "mlruns/",
    "mlartifacts/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    ".whl/",
    ".gl/",
]


def _client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address)


def portable_spec(spec: SweepSpec) -> SweepSpec:
    """Absolute storage path and sqlite URI, as seen from the submitting machine."""
    storage = spec.resolved_storage_path
    uri = spec.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri is None:
        uri = f"sqlite:///{Path(storage) / 'mlflow.db'}"
    return spec.model_copy(
        update={
            "storage_path": storage,
            "tracking": spec.tracking.model_copy(update={"uri": uri}),
        }
    )


def submit(spec: SweepSpec, address: str, wait: bool = False) -> str:
    """Validate, then submit ``mor sweep run`` as a Ray Job; returns the job id."""
    validate_spec(spec)
    spec = portable_spec(spec)
    client = _client(address)
    entrypoint = f"{shlex.quote(sys.executable)} -m cli.main sweep run --spec-from-env"
    job_id = client.submit_job(
        entrypoint=entrypoint,
        submission_id=None,
        runtime_env={
            "working_dir": str(PROJECT_ROOT),
            "excludes": UPLOAD_EXCLUDES,
            "env_vars": {SPEC_ENV: spec.model_dump_json()},
        },
        metadata={"mor.sweep": spec.name},
    )
    return job_id


def spec_from_env() -> SweepSpec:
    raw = os.environ.get(SPEC_ENV)
    if not raw:
        raise ValueError(f"{SPEC_ENV} is not set: --spec-from-env is for submitted jobs")
    return SweepSpec.model_validate_json(raw)


def status(job_id: str, address: str) -> str:
    return str(_client(address).get_job_status(job_id))


def logs(job_id: str, address: str) -> str:
    return _client(address).get_job_logs(job_id)


def stop(job_id: str, address: str) -> bool:
    return bool(_client(address).stop_job(job_id))
