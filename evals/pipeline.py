"""One call from a trained model to its compute-vs-accuracy curve in MLflow (locally or on Ray)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from evals.default_tasks import heldout_documents
from evals.reporting import log_to_mlflow, write_artifacts
from evals.runner import EvalReport, evaluate_model
from mor.checkpoint import load_pretrained, tokenizer_file


def run_eval(
    model_dir: str | Path,
    tasks: list[str],
    data_dir: str | Path | None = None,
    depths: list[str] | None = None,
    limit: int | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    out_dir: str | Path | None = None,
    tracking_uri: str | None = None,
    parent_run_id: str | None = None,
    log_mlflow: bool = True,
    work_dir: str | Path | None = None,
) -> tuple[EvalReport, str | None, Path]:
    """Evaluate an exported model at every depth, write artifacts, log a child MLflow run.

    The MLflow run defaults to a child of the training run recorded in the export's metadata,
    on the tracking URI recorded there. Returns (report, MLflow run id or None, artifacts dir).
    """
    from tokenizers import Tokenizer

    model, meta = load_pretrained(model_dir, device=device)
    tok_path = tokenizer_file(model_dir)
    report = evaluate_model(
        model,
        tasks,
        data_dir=data_dir,
        depths=depths,
        limit=limit,
        batch_size=batch_size,
        device=device,
        tokenizer=tok_path,
        work_dir=work_dir,
    )
    report.model, report.meta = str(model_dir), meta
    out = Path(out_dir) if out_dir else Path(model_dir).parent / "eval"
    sample = next((d for d in heldout_documents() if len(d) > 800), "")[:1500]
    tokenizer = Tokenizer.from_file(str(tok_path)) if tok_path else None
    write_artifacts(report, out, model=model, tokenizer=tokenizer, sample_text=sample)
    run_id = None
    if log_mlflow:
        uri = tracking_uri or meta.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI")
        if not uri:
            raise ValueError("tracking_uri: no MLflow URI given, in the export, or in the env")
        parent = parent_run_id or meta.get("mlflow_run_id")
        run_id = log_to_mlflow(report, uri, parent_run_id=parent, artifacts_dir=out)
    return report, run_id, out


def run_eval_on_ray(num_cpus: float = 1, num_gpus: float = 0, **kwargs: Any) -> Any:
    """The same evaluation as a Ray task (CPU or GPU); returns its ObjectRef."""
    import ray

    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus)(_remote_eval)
    return task.remote(**kwargs)


def _remote_eval(**kwargs: Any) -> dict[str, Any]:
    report, run_id, out = run_eval(**kwargs)
    return {"report": report.to_dict(), "run_id": run_id, "out_dir": str(out)}
