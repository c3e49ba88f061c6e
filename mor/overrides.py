"""One way to build a config: a YAML file, then dotted ``key=value`` overrides.

Every config in the platform (model, training, sweep) is a pydantic model; this module turns
a file plus a list of ``a.b.c=value`` strings into the nested dict that the model validates.
Values are parsed as YAML scalars, so ``lr=3e-3``, ``use_gpu=true`` and ``depths=[1,2]`` work.

Inputs are bounded (``MAX_CONFIG_BYTES``, ``MAX_CONFIG_NODES``): YAML aliases are shared
references, so a few hundred bytes of nested anchors ("billion laughs") expand into billions of
nodes once copied or validated; such a file is refused before anything expands it.
"""

from __future__ import annotations

import difflib
import json
import re
import textwrap
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_CONFIG_DEPTH",
    "MAX_CONFIG_NODES",
    "ConfigError",
    "apply_overrides",
    "describe_fields",
    "format_validation_error",
    "load_yaml",
    "parse_override",
    "read_config_text",
    "validate",
]

T = TypeVar("T", bound=BaseModel)

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (YAML here, an export's config.json in mor/checkpoint.py): 1 MiB."""
MAX_CONFIG_NODES = 100_000
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of lists/mappings a config may have (configs are a few levels deep)."""
"""Most values (mappings, lists and scalars) a config file or override may hold once its YAML
aliases are expanded; real configs, sweep grids included, hold a few hundred."""


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
    except (yaml.YAMLError, RecursionError):
        value = raw
    _check_size(value, f"override {key!r}")
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


def _check_size(data: Any, source: str) -> None:
    """Refuse ``data`` when it holds more than MAX_CONFIG_NODES values with aliases expanded.

    Counted over the shared references (each object once, memoised by id), so the count of a
    bomb costs its size on disk, not its expansion.
    """
    _check_depth(data, source)
    sizes: dict[int, int] = {}

    def size(node: Any) -> int:
        if not isinstance(node, (dict, list)):
            return 1
        if id(node) not in sizes:
            children = node.values() if isinstance(node, dict) else node
            sizes[id(node)] = 1 + sum(size(child) for child in children)
        return sizes[id(node)]

    if size(data) > MAX_CONFIG_NODES:
        raise ConfigError(
            f"{source}: YAML aliases expand to more than {MAX_CONFIG_NODES} values; "
            "write the values out instead of nesting anchors"
        )


def _check_depth(data: Any, source: str) -> None:
    """Refuse nesting deeper than MAX_CONFIG_DEPTH, iteratively (never a RecursionError, whatever
    the interpreter's recursion limit), visiting each shared object at most once per depth."""
    deepest: dict[int, int] = {}
    stack = [(data, 1)]
    while stack:
        node, depth = stack.pop()
        if not isinstance(node, (dict, list)) or deepest.get(id(node), 0) >= depth:
            continue
        if depth > MAX_CONFIG_DEPTH:
            raise ConfigError(f"{source} is nested too deeply (over {MAX_CONFIG_DEPTH} levels)")
        deepest[id(node)] = depth
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children)


def read_config_text(path: str | Path) -> str:
    """A config file's text; a missing file or one over MAX_CONFIG_BYTES is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist")
    with p.open("rb") as f:
        raw = f.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"config file {str(p)!r} is larger than 1 MiB; configs are small")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; a missing, oversized or aliased-bomb file, or a non-mapping, gives a
    ConfigError naming the file."""
    p = Path(path)
    text = read_config_text(p)
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(p)!r} is not valid YAML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"config file {str(p)!r} is nested too deeply") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r} must hold a mapping at the top level")
    _check_size(data, f"config file {str(p)!r}")
    return data


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model an annotation holds (``X``, ``X | None``, ``list[X]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def nearest_key(model: type[BaseModel], loc: tuple[Any, ...]) -> str | None:
    """For an unknown key at ``loc`` (its path in ``model``), the closest valid key there."""
    cls: type[BaseModel] | None = model
    for part in loc[:-1]:
        if isinstance(part, int):  # an item of a list of models
            continue
        field = cls.model_fields.get(part) if cls is not None else None
        cls = _model_in(field.annotation) if field is not None else None
        if cls is None:
            return None
    close = difflib.get_close_matches(str(loc[-1]), list(cls.model_fields), n=1, cutoff=0.6)
    return close[0] if close else None


def format_validation_error(
    exc: ValidationError, prefix: str = "", model: type[BaseModel] | None = None
) -> str:
    """Render a pydantic error as one line per field: ``field.path: message``; an unknown key
    of ``model`` gets the nearest valid one (``did you mean model.sharing?``)."""
    lines = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden" and model is not None and err["loc"]:
            near = nearest_key(model, tuple(err["loc"]))
            msg = f"unknown key {err['loc'][-1]!r}"
            if near is not None:
                msg += f"; did you mean {'.'.join([*(str(x) for x in err['loc'][:-1]), near])}?"
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
            prefix = prefix.rstrip(".")
            loc = f"{prefix}.{loc}" if loc else prefix
            msg = msg.replace("did you mean ", f"did you mean {prefix}.")
        lines.append(f"{loc or '<config>'}: {msg}")
    return "invalid config:\n  " + "\n  ".join(lines)


def validate(model: type[T], data: Mapping[str, Any], prefix: str = "") -> T:
    """Validate ``data`` against ``model``, raising ConfigError with one line per bad field."""
    try:
        return model.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, prefix, model)) from None


def describe_fields(
    values: BaseModel, prefix: str = "", expand: Mapping[str, BaseModel] | None = None
) -> list[str]:
    """Document a config: ``path = value`` per field, then its docstring, indented.

    Nested models become ``[section]`` blocks; ``expand`` maps a dotted path whose value is a
    plain dict (e.g. a train config's ``model`` section) to the model instance to list there."""
    lines: list[str] = []
    expand = expand or {}
    sections: list[tuple[str, str, BaseModel]] = []  # listed after the plain fields
    for name, field in type(values).model_fields.items():
        path, value = prefix + name, getattr(values, name)
        doc = " ".join((field.description or "").split())
        nested = expand.get(path, value)
        if isinstance(nested, BaseModel):
            sections.append((path, doc, nested))
            continue
        lines.append(f"{path} = {json.dumps(value, default=str)}")
        lines += textwrap.wrap(doc, 96, initial_indent="    ", subsequent_indent="    ")
    for path, doc, nested in sections:
        lines += ["", f"[{path}]"]
        lines += textwrap.wrap(doc, 96, initial_indent="  # ", subsequent_indent="  # ")
        lines += describe_fields(nested, path + ".", expand)
    return lines
