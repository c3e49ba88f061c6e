"""Exported models as MLflow models: logged with their training run, found again by URI.

``log_export_model`` logs an export folder as an MLflow pyfunc model named ``model`` on its
training run: it is listed under the experiment's "Logged models", can be registered, and
``mlflow.pyfunc.load_model`` loads it anywhere torch is installed. The model is "models from
code" (``core/export_pyfunc.py`` and a copy of the ``mor`` package travel with it): nothing is
pickled; the weights are the export's ``model.pt``, read weights-only by ``mor.checkpoint``.

``local_export`` turns ``runs:/RUN_ID/model``, ``models:/NAME/VERSION`` (or ``@ALIAS``,
``models:/m-ID``) into a local export folder for ``mor eval``: the model's files are
downloaded into the local cache (``core.storage.local_cache_root``), once per logged model,
and only read as data (config.json and weights-only tensors), never executed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from core.storage import local_cache_root

MODEL_NAME = "model"
"""The logged model's name on its training run: ``runs:/RUN_ID/model``."""
EXPORT_ARTIFACT = "export"
"""The pyfunc artifact holding the export folder (``artifacts/export`` in the model)."""
CODE_FILE = Path(__file__).with_name("export_pyfunc.py")
MOR_PACKAGE = Path(__file__).resolve().parents[1] / "mor"
SCHEMES = ("runs:/", "models:/")
_DONE = ".mor-complete"


def is_model_uri(ref: str) -> bool:
    """``runs:/...`` or ``models:/...``: a model kept by MLflow, not a folder."""
    return ref.startswith(SCHEMES)


def _requirements() -> list[str]:
    """Pinned to what logged it; given explicitly, so MLflow does not load the model in a
    subprocess to infer them (tens of seconds per training run)."""
    out = []
    for pkg in ("torch", "tokenizers", "pydantic", "pyyaml", "mlflow"):
        try:
            out.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            out.append(pkg)
    return out


def log_export_model(tracking_uri: str, run_id: str, export_dir: str | Path, step: int = 0) -> str:
    """Log ``export_dir`` (a local export folder) as the pyfunc model ``model`` of ``run_id``;
    the run's metrics at ``step`` (the last one) are linked to it. Returns the model id."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from mor.checkpoint import load_config

    cfg, meta = load_config(export_dir)  # a broken export fails here, before any upload
    params = {"sharing": cfg.sharing, "router": cfg.router, "num_recursions": cfg.num_recursions}
    # The fluent API is MLflow's only way to link a logged model to its run and experiment;
    # it is used for this call alone (no other code here uses an active run).
    with _use_tracking_uri(tracking_uri), _quiet_mlflow(), warnings.catch_warnings():
        # No input example on purpose: MLflow would load the model and predict to check it.
        warnings.filterwarnings("ignore", message=".*input example was not provided")
        with mlflow.start_run(run_id=run_id, log_system_metrics=False):
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=str(CODE_FILE),
                artifacts={EXPORT_ARTIFACT: str(export_dir)},
                code_paths=[str(MOR_PACKAGE)],
                pip_requirements=_requirements(),
                signature=_signature(),
                params={k: str(v) for k, v in params.items()},
                tags={"mor.run_name": str(meta.get("run_name", ""))},
                step=step,
            )
    return info.model_id


def _signature() -> Any:
    """Text in, text out; ``max_new_tokens`` and ``max_depth`` (0: the router's choice) as
    inference params (``core/export_pyfunc.py``)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [ParamSpec("max_new_tokens", "long", 32), ParamSpec("max_depth", "long", 0)]
        ),
    )


class _quiet_mlflow:
    """No progress bars and no "run ... at: URL" lines from this one fluent call."""

    def __enter__(self) -> None:
        import logging

        self.saved = os.environ.get("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
        os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
        self.log = logging.getLogger("mlflow.tracking._tracking_service.client")
        self.level = self.log.level
        self.log.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        if self.saved is None:
            os.environ.pop("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", None)
        else:
            os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = self.saved
        self.log.setLevel(self.level)


def _model_id(client: Any, uri: str) -> str | None:
    """The logged model a URI names, when it names one that cannot change (its files are
    written once): ``models:/m-ID``, ``models:/NAME/VERSION``, ``models:/NAME@ALIAS`` (the
    version it points to now), ``runs:/RUN_ID/NAME`` (the run's newest model of that name)."""
    scheme, _, rest = uri.partition(":/")
    parts = rest.strip("/").split("/")
    if scheme == "models":
        if len(parts) == 1 and parts[0].startswith("m-"):
            return parts[0]
        if len(parts) == 1 and "@" in parts[0]:
            version = client.get_model_version_by_alias(*parts[0].split("@", 1))
        elif len(parts) == 2 and parts[1].isdigit():
            version = client.get_model_version(parts[0], parts[1])
        else:
            return None  # a stage or 'latest': resolved by MLflow at download time
        # A version registered from runs:/ records its logged model as its source.
        source = str(version.source or "")
        from_source = source.removeprefix("models:/") if source.startswith("models:/m-") else None
        return version.model_id or from_source
    if len(parts) != 2:
        return None
    experiment = client.get_run(parts[0]).info.experiment_id
    found = client.search_logged_models(
        experiment_ids=[experiment],
        filter_string=f"name = '{parts[1]}' AND source_run_id = '{parts[0]}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}],
        max_results=1,
    )
    return found[0].model_id if found else None


def local_export(uri: str, tracking_uri: str) -> Path:
    """A local export folder for a ``runs:/`` or ``models:/`` URI, downloaded into the cache
    (``<cache>/mlflow-models/<model id>``, reused: a logged model's files never change). A run
    whose export was logged as plain artifacts (before models were) works too. Errors are
    ``FileNotFoundError`` naming the URI."""
    from mlflow import MlflowClient
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    client = MlflowClient(tracking_uri)
    try:
        model_id = _model_id(client, uri)
    except MlflowException as exc:
        raise FileNotFoundError(f"{uri}: not found at {tracking_uri}: {exc.message}") from None
    source = f"models:/{model_id}" if model_id else uri
    digest = hashlib.blake2b(f"{tracking_uri}|{uri}".encode(), digest_size=10).hexdigest()
    key = model_id or f"uri-{digest}"
    target = local_cache_root() / "mlflow-models" / key
    if not (model_id and (target / _DONE).is_file()):  # a mutable URI: downloaded afresh
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=target.parent))
        try:
            # MLflow resolves models:/ URIs with its global registry URI, whatever is passed.
            with _use_tracking_uri(tracking_uri), _quiet_mlflow():
                got = download_artifacts(source, dst_path=str(staging))
            (Path(got) / _DONE).write_text(uri)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(got, target)
        except MlflowException as exc:
            msg = f"{uri}: cannot download from {tracking_uri}: {exc.message}"
            raise FileNotFoundError(msg) from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return export_in(target, uri)


def export_in(folder: Path, uri: str) -> Path:
    """The export inside a downloaded model: its pyfunc artifact (read from ``MLmodel`` with
    a safe YAML load), or the folder itself when it holds the export's files directly."""
    import yaml

    if (folder / "config.json").is_file():
        return folder
    mlmodel = folder / "MLmodel"
    if mlmodel.is_file():
        conf = yaml.safe_load(mlmodel.read_text()) or {}
        artifacts = (conf.get("flavors", {}).get("python_function", {}) or {}).get("artifacts", {})
        rel = (artifacts.get(EXPORT_ARTIFACT) or {}).get("path", f"artifacts/{EXPORT_ARTIFACT}")
        found = (folder / rel).resolve()
        if found.is_relative_to(folder.resolve()) and (found / "config.json").is_file():
            return found
    raise FileNotFoundError(f"{uri}: not an exported MoR model (no config.json in its files)")
