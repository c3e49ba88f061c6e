"""Converters from the evaluation sets' original release files to the Hugging Face schemas.

Each converter reads one split's original file(s) and returns records whose field names and
values are those of the Hugging Face dataset that lm-eval's built-in task loads, so the
built-in ``doc_to_text`` / ``doc_to_target`` / ``doc_to_choice`` apply unchanged:

=============== =============================== ===========================================
task            built-in dataset (split)        original file(s) under the data directory
=============== =============================== ===========================================
lambada_openai  EleutherAI/lambada_openai       lambada_openai/lambada_test.jsonl
                (test)
hellaswag       Rowan/hellaswag (validation)    hellaswag/hellaswag_val_full.txt.bz2
piqa            baber/piqa (validation)         piqa/valid.jsonl + piqa/valid-labels.lst
winogrande      allenai/winogrande,             winogrande/dev.jsonl (+ dev-labels.lst)
                winogrande_xl (validation)
arc_easy        allenai/ai2_arc, ARC-Easy       arc/ARC-Easy-{Test,Dev,Train}.jsonl
arc_challenge   allenai/ai2_arc, ARC-Challenge  arc/ARC-Challenge-{Test,Dev,Train}.jsonl
sciq            allenai/sciq (test)             sciq/test.json (+ sciq/valid.json)
openbookqa      allenai/openbookqa, main (test) openbookqa/test.jsonl
boolq           aps/super_glue, boolq (valid.)  boolq/dev.jsonl
=============== =============================== ===========================================

See ``/work/shared/data/SOURCES.md`` section 2 for where the files come from.
"""

from __future__ import annotations

import bz2
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Record = dict[str, Any]


def read_jsonl(path: Path) -> list[Record]:
    """Read a JSON-lines file (blank lines skipped)."""
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def read_labels(path: Path) -> list[str]:
    """Read a one-label-per-line ``.lst`` file."""
    return path.read_text(encoding="utf-8").split()


def _check_len(what: str, a: list[Any], b: list[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"{what}: {len(a)} records but {len(b)} labels")


# --- LAMBADA (OpenAI) --------------------------------------------------------------------------
def convert_lambada(paths: list[Path]) -> list[Record]:
    """``{"text"}`` as in EleutherAI/lambada_openai (the HF data is this very file)."""
    return [{"text": r["text"]} for r in read_jsonl(paths[0])]


# --- HellaSwag ---------------------------------------------------------------------------------
# klosax's text rendering keeps ``ctx = ctx_a + " " + ctx_b`` but not the split between them.
# In HellaSwag, ActivityNet contexts end with ctx_b, the lower-case start of an unfinished
# sentence ("... on a roof. he"); WikiHow contexts have ``ctx_b == ""`` and end with a full
# sentence. So a context that ends with sentence punctuation gets ctx_b = "", and otherwise
# ctx_b is what follows the last sentence boundary.
_TERMINAL = re.compile(r"[.!?][\"')\]]*$")
_BOUNDARY = re.compile(r"[.!?][\"')\]]*\s+")


def split_hellaswag_ctx(ctx: str) -> tuple[str, str]:
    """Best-effort inverse of ``ctx = ctx_a + " " + ctx_b`` (see the comment above)."""
    if not ctx or _TERMINAL.search(ctx):
        return ctx, ""
    last = None
    for last in _BOUNDARY.finditer(ctx):  # noqa: B007 - we want the last match
        pass
    if last is None:
        return "", ctx
    return ctx[: last.end()].rstrip(), ctx[last.end() :]


def convert_hellaswag(paths: list[Path]) -> list[Record]:
    """Rowan/hellaswag-style records from klosax's 6-lines-per-task text file.

    Each task is ``activity_label + ": " + ctx``, the gold label, then the four endings. The
    fields the HF schema has but the file lacks (``ind``, ``source_id``, ``split_type``) are
    left out; ``ctx_a``/``ctx_b`` come from :func:`split_hellaswag_ctx`.
    """
    lines = bz2.decompress(paths[0].read_bytes()).decode("utf-8").split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if len(lines) % 6:
        raise ValueError(f"{paths[0]}: {len(lines)} lines, not a multiple of 6")
    records = []
    for i in range(0, len(lines), 6):
        head, gold, *endings = lines[i : i + 6]
        activity_label, sep, ctx = head.partition(": ")
        if not sep or gold not in {"0", "1", "2", "3"}:
            raise ValueError(f"{paths[0]}: malformed task at line {i + 1}")
        ctx_a, ctx_b = split_hellaswag_ctx(ctx)
        records.append(
            {
                "activity_label": activity_label,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": endings,
                "split": "val",
                "label": gold,
            }
        )
    return records


# --- PIQA --------------------------------------------------------------------------------------
def convert_piqa(paths: list[Path]) -> list[Record]:
    """``{"goal", "sol1", "sol2", "label"}``: valid.jsonl joined with valid-labels.lst."""
    rows, labels = read_jsonl(paths[0]), read_labels(paths[1])
    _check_len("piqa", rows, labels)
    return [
        {"goal": r["goal"], "sol1": r["sol1"], "sol2": r["sol2"], "label": int(lab)}
        for r, lab in zip(rows, labels)
    ]


# --- WinoGrande --------------------------------------------------------------------------------
def convert_winogrande(paths: list[Path]) -> list[Record]:
    """``{"sentence", "option1", "option2", "answer"}`` (answer "1"/"2", a string, as on HF).

    When ``dev-labels.lst`` sits next to ``dev.jsonl`` the answers are checked against it.
    """
    rows = read_jsonl(paths[0])
    labels_path = paths[0].with_name(paths[0].stem + "-labels.lst")
    if labels_path.is_file():
        labels = read_labels(labels_path)
        _check_len("winogrande", rows, labels)
        bad = [i for i, (r, lab) in enumerate(zip(rows, labels)) if str(r["answer"]) != lab]
        if bad:
            raise ValueError(f"winogrande: answers disagree with {labels_path} at rows {bad[:5]}")
    return [
        {
            "sentence": r["sentence"],
            "option1": r["option1"],
            "option2": r["option2"],
            "answer": str(r["answer"]),
        }
        for r in rows
    ]


# --- ARC / OpenBookQA (AI2 "Main" question format) ---------------------------------------------
def _choices(question: Record) -> Record:
    return {
        "text": [c["text"] for c in question["choices"]],
        "label": [c["label"] for c in question["choices"]],
    }


def convert_arc(paths: list[Path]) -> list[Record]:
    """``{"id", "question", "choices": {"text", "label"}, "answerKey"}`` as in allenai/ai2_arc.

    Labels are kept as they are (about 1% of the items use 1-4 instead of A-D, as on HF).
    """
    return [
        {
            "id": r["id"],
            "question": r["question"]["stem"],
            "choices": _choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in read_jsonl(paths[0])
    ]


def convert_openbookqa(paths: list[Path]) -> list[Record]:
    """``{"id", "question_stem", "choices": {"text", "label"}, "answerKey"}`` (HF "main")."""
    return [
        {
            "id": r["id"],
            "question_stem": r["question"]["stem"],
            "choices": _choices(r["question"]),
            "answerKey": r["answerKey"],
        }
        for r in read_jsonl(paths[0])
    ]


# --- SciQ --------------------------------------------------------------------------------------
def convert_sciq(paths: list[Path]) -> list[Record]:
    """allenai/sciq records (the original JSON list already has the HF field names)."""
    with open(paths[0], encoding="utf-8") as fh:
        rows = json.load(fh)
    keys = ("question", "distractor3", "distractor1", "distractor2", "correct_answer", "support")
    return [{k: r[k] for k in keys} for r in rows]


# --- BoolQ (SuperGLUE) -------------------------------------------------------------------------
def convert_boolq(paths: list[Path]) -> list[Record]:
    """aps/super_glue ``boolq`` records: ``{"question", "passage", "idx", "label"}``.

    SuperGLUE's BoolQ passage is ``title + " -- " + passage`` of the original release (e.g.
    "Ethanol fuel -- All biomass goes through ..."), and ``label = int(answer)``.
    """
    return [
        {
            "question": r["question"],
            "passage": f"{r['title']} -- {r['passage']}",
            "idx": i,
            "label": int(bool(r["answer"])),
        }
        for i, r in enumerate(read_jsonl(paths[0]))
    ]


# --- task table --------------------------------------------------------------------------------
SPLIT_KEYS = {"train": "training_split", "validation": "validation_split", "test": "test_split"}


@dataclass(frozen=True)
class SplitSource:
    """Where one split of a task comes from.

    Attributes:
        split: the HF split name the built-in task uses ("train", "validation" or "test").
        files: the original files, relative to the data directory; all must exist.
        required: if False the split is simply left out when its files are missing.
    """

    split: str
    files: tuple[str, ...]
    required: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """One offline task: its splits and the converter applied to each split's files."""

    name: str
    splits: tuple[SplitSource, ...]
    convert: Callable[[list[Path]], list[Record]]


def _arc(name: str, subset: str) -> TaskSpec:
    return TaskSpec(
        name,
        (
            SplitSource("train", (f"arc/ARC-{subset}-Train.jsonl",), required=False),
            SplitSource("validation", (f"arc/ARC-{subset}-Dev.jsonl",), required=False),
            SplitSource("test", (f"arc/ARC-{subset}-Test.jsonl",)),
        ),
        convert_arc,
    )


TASK_SPECS: dict[str, TaskSpec] = {
    s.name: s
    for s in (
        TaskSpec(
            "lambada_openai",
            (SplitSource("test", ("lambada_openai/lambada_test.jsonl",)),),
            convert_lambada,
        ),
        TaskSpec(
            "hellaswag",
            (SplitSource("validation", ("hellaswag/hellaswag_val_full.txt.bz2",)),),
            convert_hellaswag,
        ),
        TaskSpec(
            "piqa",
            (SplitSource("validation", ("piqa/valid.jsonl", "piqa/valid-labels.lst")),),
            convert_piqa,
        ),
        TaskSpec(
            "winogrande",
            (SplitSource("validation", ("winogrande/dev.jsonl",)),),
            convert_winogrande,
        ),
        _arc("arc_easy", "Easy"),
        _arc("arc_challenge", "Challenge"),
        TaskSpec(
            "sciq",
            (
                SplitSource("validation", ("sciq/valid.json",), required=False),
                SplitSource("test", ("sciq/test.json",)),
            ),
            convert_sciq,
        ),
        TaskSpec(
            "openbookqa",
            (SplitSource("test", ("openbookqa/test.jsonl",)),),
            convert_openbookqa,
        ),
        TaskSpec(
            "boolq",
            (SplitSource("validation", ("boolq/dev.jsonl",)),),
            convert_boolq,
        ),
    )
}
