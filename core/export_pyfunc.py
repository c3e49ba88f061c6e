"""The MLflow pyfunc model of an exported MoR model ("models from code": MLflow copies this file
into the logged model and runs it on load; nothing is pickled).

The model's only artifact is the export folder (config.json, model.pt, tokenizer.json), loaded
by ``mor.checkpoint.load_pretrained``: weights-only, checked against the config. ``predict``
continues each prompt greedily::

    model = mlflow.pyfunc.load_model("models:/mor-ec/1")
    model.predict(["To be, or not"], params={"max_new_tokens": 16, "max_depth": 2})

Logged by ``core.mlflow_model.log_export_model``; never imported as a module (loading it calls
``mlflow.models.set_model``). Loading needs mor-platform installed (``mor`` imports).
"""

from __future__ import annotations

from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel


class MoRExportModel(PythonModel):
    """Greedy continuation of text prompts by an exported MoR model."""

    # The logged signature (text in, text out, with params) describes ``predict``, which has
    # no type hints: MLflow would derive a signature from them, and such signatures cannot
    # carry params (max_new_tokens, max_depth).
    _skip_type_hint_validation = True

    def load_context(self, context: Any) -> None:
        from tokenizers import Tokenizer

        from mor.checkpoint import load_pretrained, tokenizer_file

        export = context.artifacts["export"]
        self.model, self.meta = load_pretrained(export)
        path = tokenizer_file(export)
        if path is None:
            raise ValueError(f"{export}: the export has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(path))

    def predict(self, context, model_input, params=None):
        """Each prompt's continuation: ``max_new_tokens`` (default 32) greedy tokens, at most
        ``max_depth`` recursions per token (default 0: the router's choice). ``model_input``:
        a list of strings, or a one-column DataFrame of them (what MLflow serving sends)."""
        import torch

        from mor.generation import generate

        params = params or {}
        window = self.model.cfg.max_seq_len  # prompt and continuation fit the trained window
        n_new = min(int(params.get("max_new_tokens", 32)), window - 1)
        if hasattr(model_input, "iloc"):  # a DataFrame: its first column
            model_input = model_input.iloc[:, 0].tolist()
        out = []
        for text in model_input:
            ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            ids = ids[-(window - n_new) :] or [self.meta.get("eos_id") or 0]
            new = generate(
                self.model,
                torch.tensor([ids]),
                max_new_tokens=n_new,
                eos_id=self.meta.get("eos_id"),
                max_depth=int(params.get("max_depth") or 0) or None,
            )
            out.append(self.tokenizer.decode(new[0].tolist()))
        return out


mlflow.models.set_model(MoRExportModel())
