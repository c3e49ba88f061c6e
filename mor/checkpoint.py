"""The exported-model format: a folder that loads with PyTorch alone (no DeepSpeed, no Ray).

export/
  config.json      {"model": MoRConfig fields, "meta": training metadata}
  model.pt         fp32 state_dict (weights_only-loadable)
  tokenizer.json   the tokenizer the model was trained with (when known)

``meta`` is free-form, but a `mor train` export always records: ``eos_id`` (the end-of-text id
documents were separated with; the eval backend uses it), ``mlflow_run_id`` and
``tracking_uri`` (the training run and its MLflow, credentials stripped: ``mor eval EXPORT``
logs its run as that run's child there), ``run_name``, ``seq_len`` and ``flops_convention``.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from mor.config import MoRConfig
from mor.model import MoRModel
from mor.overrides import read_config_text

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
TOKENIZER_FILE = "tokenizer.json"


def save_pretrained(
    out_dir: str | Path,
    cfg: MoRConfig,
    state_dict: dict[str, torch.Tensor],
    meta: dict[str, Any] | None = None,
    tokenizer_path: str | Path | None = None,
) -> Path:
    """Write an export folder atomically (a reader never sees a half-written one)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        weights = {
            k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()
        }
        torch.save(weights, tmp / WEIGHTS_FILE)
        payload = {"model": cfg.model_dump(mode="json"), "meta": meta or {}}
        (tmp / CONFIG_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER_FILE)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def load_config(export_dir: str | Path) -> tuple[MoRConfig, dict[str, Any]]:
    path = Path(export_dir) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{export_dir}: not an exported MoR model (no {CONFIG_FILE})")
    """(model config, training metadata) of an export; a config.json that is not JSON, has no
    "model" mapping or invalid fields is a ValueError naming the file (a tampered export)."""
    text = read_config_text(path)  # bounded: refuses files over 1 MiB
    try:
        payload = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc}): a damaged or tampered export") from None
    model = payload.get("model") if isinstance(payload, dict) else None
    if not isinstance(model, dict):
        raise ValueError(f'{path}: no "model" mapping: a damaged or tampered export')
    meta = payload.get("meta", {})
    if not isinstance(meta, dict):
        raise ValueError(f'{path}: "meta" is not a mapping: a damaged or tampered export')
    model = dict(model)
    # Exports from before ec_inference existed decided by logit > 0: keep their rule.
    if model.get("router") == "expert_choice":
        model.setdefault("ec_inference", "threshold")
    try:
        return MoRConfig.model_validate(model), meta
    except ValueError as exc:  # pydantic's ValidationError: one line per bad field
        raise ValueError(f"{path}: invalid model config: {exc}") from None


def load_pretrained(
    export_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[MoRModel, dict[str, Any]]:
    """Load an exported model in eval() mode; returns (model, training metadata).

    The config is checked against the weights before the model is allocated, so a tampered
    config (``hidden_size=16384`` beside small weights) is a ValueError, not gigabytes of RAM.
    """
    cfg, meta = load_config(export_dir)
    path = Path(export_dir) / WEIGHTS_FILE
    state = _load_weights(path)
    _check_weights(cfg, state, path)
    model = MoRModel(cfg)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), meta


def _load_weights(path: Path) -> Any:
    """The state_dict in ``path``, loaded weights-only: a pickled payload is refused, never run.
    A file that is not torch.save's zip format, or holds objects other than tensors, is a
    ValueError naming the file (a damaged or tampered export), not pickle's traceback."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (an export holds {WEIGHTS_FILE})")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path}: not a PyTorch weights file: a damaged or tampered export")
    try:
        # mmap: the tensors stay on disk until copied into the model (no second full copy).
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise ValueError(
            f"{path}: holds objects other than tensors (refused: loading them could run code): "
            "a tampered export"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ValueError(f"{path}: unreadable weights ({first}): a damaged export") from None


def _check_weights(cfg: MoRConfig, state: Any, path: Path) -> None:
    """Raise ValueError naming the first tensor whose name or shape the config does not expect.

    The expected names and shapes (buffers included) come from the model built on the meta
    device, which allocates no memory.
    """
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state_dict (got {type(state).__name__})")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MoRModel(cfg).state_dict().items()}
    for name, shape in expected.items():
        if name not in state:
            raise ValueError(f"{path}: missing tensor {name!r} that config.json expects")
        got = tuple(getattr(state[name], "shape", ()))
        if got != shape:
            raise ValueError(
                f"{path}: tensor {name!r} has shape {list(got)} but config.json expects "
                f"{list(shape)}"
            )
    unexpected = [k for k in state if k not in expected]
    if unexpected:
        raise ValueError(f"{path}: unexpected tensor {unexpected[0]!r} for this config.json")


def tokenizer_file(export_dir: str | Path) -> Path | None:
    p = Path(export_dir) / TOKENIZER_FILE
    return p if p.is_file() else None
