"""Offline lm-eval tasks for the MoR paper's evaluation sets, read from their original files.

The tasks keep lm-eval's own names (``--tasks hellaswag`` means the same offline and online) and
lm-eval 0.4.13's built-in prompts, targets, choices and metrics, so the scores are comparable with
published lm-eval numbers. Only the data source differs: :func:`prepare_tasks` converts each
set's original release files (see ``/work/shared/data/SOURCES.md``, section 2) into the schema
of the Hugging Face dataset the built-in task loads, and writes, into one folder:

* ``data/<task>.<split>.jsonl``: the converted records (``convert.py``);
* ``<task>.yaml``: the static template from ``templates/`` plus the split keys and
  ``dataset_kwargs: {data_files: {<split>: <absolute path>}, cache_dir: ...}`` for
  ``dataset_path: json``;
* ``utils.py``: the built-in Python helpers (hellaswag ``process_docs``, winogrande
  ``doc_to_*``), referenced from the YAMLs as ``!function utils.<name>``.

Use the folder as ``TaskManager(include_path=...)``, or call :func:`task_manager`.

Name collisions with the built-ins: lm-eval indexes ``include_path`` after its own task folder
and a later entry replaces an earlier one of the same name (with a logged warning), so with
``include_defaults=True`` our ``hellaswag`` etc. win. ``task_manager`` defaults to
``include_defaults=False`` all the same: only these tasks can load offline, the index is built
in milliseconds instead of ~5 s, and nothing is overridden. Our YAMLs carry no ``tag``: lm-eval
replaces a whole tag entry when a later path defines it, so redefining ``multiple_choice`` or
``lambada`` would silently drop the built-in's other members of those tags. Built-in tags and
groups that list these task names (``ai2_arc``, ``super-glue-lm-eval-v1``) still resolve to our
tasks by name when the defaults are included.

Few-shot: all built-ins default to 0-shot, and so do these. A non-zero ``num_fewshot`` matches the
built-in only where the built-in's few-shot split exists offline (``FEWSHOT_AS_BUILTIN``);
elsewhere the examples come from another split (see each template's header comment).

Known differences from the built-ins:

* hellaswag: the data is a text rendering of the official validation jsonl (the original is not
  available); its ctx_a/ctx_b split is reconstructed heuristically and a few WikiHow texts may
  differ in leading/trailing whitespace (``templates/hellaswag.yaml`` lists them).
* no ``tag`` entries (above); openbookqa has ``fewshot_split: test`` (few-shot only).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from evals.tasks.convert import SPLIT_KEYS, TASK_SPECS, Record, TaskSpec

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

__all__ = [
    "FEWSHOT_AS_BUILTIN",
    "TASK_NAMES",
    "convert_task",
    "prepare_tasks",
    "task_manager",
]

TASK_NAMES: tuple[str, ...] = (
    "lambada_openai",
    "hellaswag",
    "piqa",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "sciq",
    "openbookqa",
    "boolq",
)
"""The offline tasks, named as lm-eval's built-ins."""

FEWSHOT_AS_BUILTIN: frozenset[str] = frozenset({"lambada_openai", "arc_easy", "arc_challenge"})
"""Tasks whose few-shot examples come from the same split as the built-in's (for ARC: when the
ARC-*-Train.jsonl files are in the data directory). For the others only 0-shot is comparable."""

_PKG_DIR = Path(__file__).resolve().parent
_TEMPLATES = _PKG_DIR / "templates"
_UTILS = _PKG_DIR / "utils.py"
DATA_SUBDIR = "data"
CACHE_SUBDIR = ".hf_datasets_cache"


def _resolve_names(tasks: Iterable[str] | None) -> list[str]:
    if tasks is None:
        return list(TASK_NAMES)
    if isinstance(tasks, str):
        tasks = [tasks]
    names = list(dict.fromkeys(tasks))
    unknown = [t for t in names if t not in TASK_SPECS]
    if unknown:
        raise ValueError(f"unknown offline task(s) {unknown}; known: {', '.join(TASK_NAMES)}")
    return names


def _split_files(spec: TaskSpec, data_dir: Path) -> dict[str, list[Path]]:
    """The split -> files map of a task; raises FileNotFoundError for a missing required file."""
    found: dict[str, list[Path]] = {}
    for src in spec.splits:
        paths = [data_dir / f for f in src.files]
        missing = [p for p in paths if not p.is_file()]
        if not missing:
            found[src.split] = paths
        elif src.required:
            raise FileNotFoundError(
                f"{spec.name}: data file not found: {missing[0]} "
                f"(expected under the data directory {data_dir})"
            )
    return found


def convert_task(name: str, data_dir: str | Path) -> dict[str, list[Record]]:
    """Convert one task's original files under ``data_dir``: ``{split: records}``."""
    spec = TASK_SPECS[_resolve_names([name])[0]]
    files = _split_files(spec, Path(data_dir).expanduser().resolve())
    return {split: spec.convert(paths) for split, paths in files.items()}


def _write_if_changed(path: Path, data: bytes) -> bool:
    """Write ``data`` unless the file already holds exactly it (keeps mtimes and HF caches)."""
    if path.is_file() and path.read_bytes() == data:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)
    return True


def _jsonl(records: Sequence[Record]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def _yaml_text(name: str, data_dir: Path, out: Path, data_files: dict[str, Path]) -> str:
    """The template plus the generated split keys and dataset_kwargs (JSON strings are YAML)."""
    template = (_TEMPLATES / f"{name}.yaml").read_text(encoding="utf-8")
    order = [s for s in ("train", "validation", "test") if s in data_files]
    lines = [
        template.rstrip("\n"),
        "",
        f"# --- generated by evals.tasks.prepare_tasks from {data_dir} ---",
        *(f"{SPLIT_KEYS[s]}: {s}" for s in order),
        "dataset_kwargs:",
        "  data_files:",
        *(f"    {s}: {json.dumps(str(data_files[s]))}" for s in order),
        f"  cache_dir: {json.dumps(str(out / CACHE_SUBDIR))}",
    ]
    return "\n".join(lines) + "\n"


def prepare_tasks(
    data_dir: str | Path, out_dir: str | Path, tasks: list[str] | None = None
) -> Path:
    """Convert the requested tasks' original files and write their lm-eval YAMLs into ``out_dir``.

    Args:
        data_dir: the folder holding the original files (layout of ``/work/shared/data/eval``:
            ``lambada_openai/lambada_test.jsonl``, ``hellaswag/hellaswag_val_full.txt.bz2``, ...).
        out_dir: where the YAMLs, ``utils.py`` and ``data/*.jsonl`` go (created if needed).
        tasks: names from :data:`TASK_NAMES`; ``None`` means all of them.

    Returns:
        ``out_dir`` (absolute), for ``lm_eval.tasks.TaskManager(include_path=str(out_dir))``.

    Raises:
        FileNotFoundError: a required file of a requested task is missing; the message names the
            task and the expected path. Nothing is written in that case.
        ValueError: an unknown task name, or a malformed data file.

    Deterministic and idempotent: files whose content would not change are not rewritten. YAMLs
    of tasks prepared earlier into the same folder are left in place.
    """
    names = _resolve_names(tasks)
    data = Path(data_dir).expanduser().resolve()
    out = Path(out_dir).expanduser().resolve()
    files = {name: _split_files(TASK_SPECS[name], data) for name in names}  # check all first

    (out / DATA_SUBDIR).mkdir(parents=True, exist_ok=True)
    _write_if_changed(out / "utils.py", _UTILS.read_bytes())
    for name in names:
        spec = TASK_SPECS[name]
        data_files: dict[str, Path] = {}
        for split, paths in files[name].items():
            target = out / DATA_SUBDIR / f"{name}.{split}.jsonl"
            _write_if_changed(target, _jsonl(spec.convert(paths)))
            data_files[split] = target
        yaml_text = _yaml_text(name, data, out, data_files)
        _write_if_changed(out / f"{name}.yaml", yaml_text.encode("utf-8"))
    return out


def task_manager(
    data_dir: str | Path,
    out_dir: str | Path,
    tasks: list[str] | None = None,
    *,
    include_defaults: bool = False,
) -> TaskManager:
    """:func:`prepare_tasks`, then a ``TaskManager`` over ``out_dir``.

    With ``include_defaults=True`` lm-eval's built-in tasks are indexed too and ours replace the
    built-ins of the same names (see the module docstring).
    """
    from lm_eval.tasks import TaskManager

    out = prepare_tasks(data_dir, out_dir, tasks)
    return TaskManager(include_path=str(out), include_defaults=include_defaults)
