"""One call from a trained model to its compute-vs-accuracy curve in MLflow (locally or on Ray).

The order is the contract: evaluate, write the artifacts (and, in the CLI, print the table),
and only then log to MLflow. A logging failure (a dead server, a missing parent run) raises
``EvalLoggingError`` naming the URI and the folder that already holds the results; it never
throws away an evaluation that took minutes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from core.endpoints import (
    check_mlflow_reachable,
    redact,
    resolve_tracking_uri,
    strip_credentials,
)
from core.storage import Location
from core.system_metrics import SystemMetricsSampler
from evals.default_tasks import heldout_documents
from evals.reporting import log_to_mlflow, write_artifacts
from evals.runner import EvalReport, evaluate_model
from mor.checkpoint import load_pretrained, tokenizer_file


class EvalLoggingError(RuntimeError):
    """The evaluation finished and its files are written, but MLflow did not take the run.

    Built by ``logging_error``; its args are (message, URI, folder) so it pickles (Ray)."""

    def __str__(self) -> str:
        return str(self.args[0])

    @property
    def uri(self) -> str:
        return str(self.args[1])

    @property
    def out_dir(self) -> Path:
        return Path(self.args[2])


def logging_error(uri: str, out_dir: Path, cause: BaseException) -> EvalLoggingError:
    """An ``EvalLoggingError`` whose message names the URI (credentials redacted), the
    cause's first line and where the results are."""
    safe = strip_credentials(uri)
    detail = redact(f"{type(cause).__name__}: {cause}").strip().splitlines()
    reason = (detail[0] if detail else type(cause).__name__)[:300]
    message = f"could not log to MLflow at {safe}: {reason}; the results are in {out_dir}"
    return EvalLoggingError(message, safe, str(out_dir))


def evaluate_export(
    model_dir: str | Path,
    tasks: list[str],
    data_dir: str | Path | None = None,
    depths: list[str] | None = None,
    topk: bool = False,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    title: str | None = None,
) -> tuple[EvalReport, Path]:
    """Evaluate an exported model at every depth and write its artifacts; (report, folder).

    The export's ``eos_id`` reaches the lm-eval backend; ``report.meta`` is the export's
    metadata (its recorded MLflow run and tracking URI, used by ``log_eval``). ``model_dir``
    may be an object-store URI (a run whose storage is one): it is read through a local copy.
    ``title`` names the model on the console (default: its training run's name).
    """
    from tokenizers import Tokenizer

    local = Location.parse(model_dir).local_folder()
    model, meta = load_pretrained(local, device=device)
    tok_path = tokenizer_file(local)
    samples: list[Any] = []  # system metrics, logged with the eval run (created afterwards)
    with SystemMetricsSampler(samples.extend):
        report = evaluate_model(
            model,
            tasks,
            data_dir=data_dir,
            depths=depths,
            topk=topk,
            limit=limit,
            batch_size=batch_size,
            device=device,
            tokenizer=tok_path,
            work_dir=work_dir,
            eos_id=meta.get("eos_id"),
            title=title or meta.get("run_name"),
        )
    report.model, report.meta, report.system_metrics = str(model_dir), meta, samples
    out = Path(out_dir) if out_dir else local.parent / "eval"
    sample = next((d for d in heldout_documents() if len(d) > 800), "")[:1500]
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path else None
    write_artifacts(report, out, model=model, tokenizer=tokenizer, sample_text=sample)
    return report, out


def eval_tracking_uri(report: EvalReport, explicit: str | None = None) -> str:
    """Where the eval run goes: the one resolution (``core.endpoints``), with the URI the
    export recorded ranking right after an explicit one, so the run lands beside its training
    run. Without any, the sqlite store of the export's storage root (STORAGE/runs/NAME/export)."""
    export = Location.parse(report.model).uri.split("/")
    storage = "/".join(export[:-3]) if export[-3:-2] == ["runs"] else "outputs"
    return resolve_tracking_uri(explicit, storage, recorded=report.meta.get("tracking_uri"))


def log_eval(
    report: EvalReport, out_dir: Path, tracking_uri: str, parent_run_id: str | None = None
) -> str:
    """Log a written evaluation as a child of ``parent_run_id`` (default: the export's
    training run); returns the eval run id, or raises ``EvalLoggingError``."""
    parent = parent_run_id or report.meta.get("mlflow_run_id")
    try:
        check_mlflow_reachable(tracking_uri)  # seconds, not MLflow's minutes of retries
        return log_to_mlflow(report, tracking_uri, parent_run_id=parent, artifacts_dir=out_dir)
    except Exception as exc:  # any failure to log: the results on disk stay the answer
        raise logging_error(tracking_uri, out_dir, exc) from exc


def run_eval(
    model_dir: str | Path,
    tasks: list[str],
    *,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    log_mlflow: bool = True,
    **settings: Any,
) -> tuple[EvalReport, str | None, Path]:
    """Evaluate, write artifacts, then log a child MLflow run of the training run.

    ``settings`` are ``evaluate_export``'s keyword arguments (data_dir, depths, topk, limit,
    batch_size, device, out_dir, work_dir, title). Returns (report, MLflow run id or None, artifacts
    dir); a logging failure raises ``EvalLoggingError`` after the artifacts are written.
    """
    report, out = evaluate_export(model_dir, tasks, **settings)
    run_id = None
    if log_mlflow:
        uri = eval_tracking_uri(report, tracking_uri)
        run_id = log_eval(report, out, uri, parent_run_id=parent_run_id)
    return report, run_id, out
