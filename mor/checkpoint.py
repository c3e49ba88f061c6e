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
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from mor.config import MoRConfig
from mor.model import MoRModel

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
    payload = json.loads(path.read_text())
    model = dict(payload["model"])
    # Exports from before ec_inference existed decided by logit > 0: keep their rule.
    if model.get("router") == "expert_choice":
        model.setdefault("ec_inference", "threshold")
    return MoRConfig.model_validate(model), payload.get("meta", {})


def load_pretrained(
    export_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> tuple[MoRModel, dict[str, Any]]:
    """Load an exported model in eval() mode; returns (model, training metadata)."""
    cfg, meta = load_config(export_dir)
    model = MoRModel(cfg)
    state = torch.load(Path(export_dir) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state)
    model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), meta


def tokenizer_file(export_dir: str | Path) -> Path | None:
    p = Path(export_dir) / TOKENIZER_FILE
    return p if p.is_file() else None
