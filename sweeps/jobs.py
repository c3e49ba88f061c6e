"""Submit a sweep to a Ray cluster as a Ray Job, and follow it (status, logs, stop).

The spec is validated here, before anything reaches the cluster, then travels as JSON in the
job's environment; the project travels as the job's ``working_dir``. Relative storage paths and
sqlite tracking URIs are made absolute first, so a local head writes where the user expects
(on a real cluster, use a shared path or object store and an MLflow server).

Nothing secret travels with the job: its entrypoint, environment and metadata are readable by
anyone who can reach the Jobs API, and Ray writes them to its log files. A tracking URI's
``user:password@`` is stripped (with a warning); the cluster provides MLflow's credentials itself
(MLFLOW_TRACKING_USERNAME/PASSWORD in the environment Ray was started with, or
``~/.mlflow/credentials`` for the user Ray runs as).
"""

from __future__ import annotations

import os
import shlex
import sys
from pathlib import Path
from typing import Any

from sweeps.plan import SweepPlan
from sweeps.spec import SweepSpec

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


def portable_spec(spec: SweepSpec, job_server: str | None = None) -> SweepSpec:
    """Absolute storage path and an explicit tracking URI, as seen from the submitting
    machine: ``core.endpoints`` resolves it for ``job_server`` (the `mor up` stack's MLflow
    when the job goes to the stack's head; an absolute sqlite store otherwise)."""
    from core.endpoints import resolve_endpoints

    storage = spec.resolved_storage_path
    uri = resolve_endpoints(
        job_server=job_server,
        tracking_uri=spec.tracking.uri,
        storage_path=storage,
        target="jobs",
    ).tracking_uri
    return spec.model_copy(
        update={
            "storage_path": storage,
            "tracking": spec.tracking.model_copy(update={"uri": uri}),
        }
    )


def build_submission(spec: SweepSpec, address: str) -> dict[str, Any]:
    """The keyword arguments of ``JobSubmissionClient.submit_job`` for ``spec``: what the Jobs
    API will show. Credentials in the tracking URI are stripped here, with a warning."""
    from core.endpoints import redact, strip_credentials

    spec = portable_spec(spec, address)
    uri = spec.tracking.uri or ""
    if strip_credentials(uri) != uri:
        print(
            f"[mor] warning: tracking.uri {redact(uri)} carries credentials; they are not sent "
            "with the job (the Jobs API and Ray's logs would show them). Provide them on the "
            "cluster: MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD in Ray's environment or "
            "~/.mlflow/credentials",
            file=sys.stderr,
        )
        tracking = spec.tracking.model_copy(update={"uri": strip_credentials(uri)})
        spec = spec.model_copy(update={"tracking": tracking})
    return {
        "entrypoint": f"{shlex.quote(sys.executable)} -m cli.main sweep run --spec-from-env",
        "runtime_env": {
            "working_dir": str(PROJECT_ROOT),
            "excludes": UPLOAD_EXCLUDES,
            "env_vars": {SPEC_ENV: spec.model_dump_json()},
        },
        "metadata": {"mor.sweep": spec.name},
    }


def submit(plan: SweepPlan, address: str) -> str:
    """Submit ``mor sweep run`` for an already validated sweep as a Ray Job; returns the job
    id. The job server must answer first: a clear error, not Ray's connection traceback."""
    submission = build_submission(plan.spec, address)
    try:
        client = _client(address)
    except (ConnectionError, OSError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        msg = f"--address: the Ray job server at {address} does not answer: {first}"
        raise ValueError(msg) from None
    return client.submit_job(submission_id=None, **submission)


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
