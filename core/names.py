"""The one rule for names that become folders and MLflow names: runs, sweeps, experiments.

A run name is a Ray run folder (``<storage>/runs/<name>``) and an experiment name an artifact
folder (``mlartifacts/<experiment>``), so each must be one safe path component: no ``/``, no
``..``, no whitespace. ``re.fullmatch`` anchors both ends (``$`` would accept a trailing newline).
"""

from __future__ import annotations

import re

__all__ = ["NAME_CHARS", "check_name"]

NAME_CHARS = "letters, digits, '.', '_' or '-', starting with a letter or digit"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def check_name(value: str, max_len: int = 100) -> str:
    """Return ``value`` if it is a safe name of at most ``max_len`` characters, else raise a
    ValueError saying what is allowed (pydantic prefixes the field)."""
    if len(value) > max_len or not _NAME.fullmatch(value):
        raise ValueError(
            f"use {NAME_CHARS} (at most {max_len}, no spaces or '/'); got {value[:50]!r}"
        )
    return value
