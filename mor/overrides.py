"""One way to build a config: a YAML file, then dotted ``key=value`` overrides.

Every config in the platform (model, training, sweep) is a pydantic model; this module turns
a file plus a list of ``a.b.c=value`` strings into the nested dict that the model validates.
Values are parsed as YAML scalars, so ``lr=3e-3``, ``use_gpu=true`` and ``depths=[1,2]`` work.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "ConfigError",
    "apply_overrides",
    "format_validation_error",
    "load_yaml",
    "parse_override",
    "validate",
]

T = TypeVar("T", bound=BaseModel)


class ConfigError(ValueError):
    """A config or override is invalid; the message names the field and what is allowed."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``a.b.c=value`` into (["a", "b", "c"], parsed value)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Return a deep copy of ``data`` with each dotted override applied in order."""
    out: dict[str, Any] = _deep_copy(dict(data))
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = {}
                node[part] = child
            elif not isinstance(child, dict):
                raise ConfigError(
                    f"override {item!r}: {part!r} is a value ({child!r}), not a section"
                )
            node = child
        node[path[-1]] = value
    return out


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing file or a non-mapping gives a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    return data


def format_validation_error(exc: ValidationError, prefix: str = "") -> str:
    """Render a pydantic error as one line per field: ``field.path: message``."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        if msg.startswith("invalid config:"):
            msg = msg[len("invalid config:") :].strip()
        named = re.match(r"^([A-Za-z_][\w.]*): ", msg)
        if named:
            # A model-level check names its own field ("num_layers: ..."), relative to loc, or a
            # nested error is already prefixed with this location ("model.router: ...").
            field = named.group(1)
            loc = field if not loc or field.startswith(loc + ".") else f"{loc}.{field}"
            msg = msg[named.end() :]
        if prefix:
            loc = f"{prefix}.{loc}" if loc else prefix
        lines.append(f"{loc or '<config>'}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(model: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against ``model``, raising ConfigError with one line per bad field."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix)) from None
