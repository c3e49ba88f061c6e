"""Embedded default tasks, built from the held-out split of the default corpus (no files needed).

- ``mor_heldout_bpb``: bits-per-byte (and word/byte perplexity) of held-out documents, by
  ``loglikelihood_rolling`` (the same metrics lm-eval's wikitext task reports).
- ``mor_heldout_mc``: 4-way multiple choice: a passage of held-out text, and the true next
  span against three spans taken from other held-out documents. Even tiny CPU models beat
  chance on it, and deeper/better models beat it more, so configurations separate.

The held-out split is the one the trainers never train on (``mor.corpus.split_documents``
with the default 5% validation fraction).
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from mor.corpus import default_corpus_documents, split_documents

DEFAULT_TASKS = ("mor_heldout_bpb", "mor_heldout_mc")
VAL_FRACTION = 0.05  # the trainers' DataConfig default
BPB_DOC_CHARS = 2000
MC_CONTEXT_CHARS = 300
MC_SPAN_CHARS = 60

_BPB_YAML = """task: mor_heldout_bpb
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
should_decontaminate: false
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
"""

_MC_YAML = """task: mor_heldout_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{label}}}}"
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def heldout_documents() -> list[str]:
    _, val = split_documents(default_corpus_documents(), VAL_FRACTION)
    return val


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _cut_at_word(text: str, n: int) -> str:
    """The first ~n characters of text, ending at a word boundary."""
    if len(text) <= n:
        return text
    cut = text.rfind(" ", 0, n)
    return text[: cut if cut > n // 2 else n]


def bpb_docs(docs: list[str]) -> list[dict[str, str]]:
    out = []
    for doc in docs:
        text = doc.strip()
        for i in range(0, len(text), BPB_DOC_CHARS):
            piece = text[i : i + BPB_DOC_CHARS].strip()
            if len(piece) > 200:
                out.append({"text": piece})
    return out


def mc_items(docs: list[str], seed: int = 0) -> list[dict[str, object]]:
    """Passages and their true continuation vs. three continuations from other documents."""
    rng = random.Random(seed)
    windows: list[tuple[int, str, str]] = []
    for d, doc in enumerate(docs):
        text = _clean(doc)
        step = MC_CONTEXT_CHARS + MC_SPAN_CHARS
        for start in range(0, len(text) - step, step):
            ctx = _cut_at_word(text[start:], MC_CONTEXT_CHARS)
            rest = text[start + len(ctx) :].lstrip()
            span = _cut_at_word(rest, MC_SPAN_CHARS)
            if len(span) > 20:
                windows.append((d, ctx, span))
    items = []
    for d, ctx, span in windows:
        others = [w[2] for w in windows if w[0] != d]
        if len(others) < 3:
            continue
        choices = [" " + span] + [" " + s for s in rng.sample(others, 3)]
        order = list(range(4))
        rng.shuffle(order)
        items.append(
            {
                "context": ctx,
                "choices": [choices[i] for i in order],
                "label": order.index(0),
            }
        )
    return items


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def prepare_default_tasks(out_dir: str | Path) -> Path:
    """Write the default tasks' data and YAMLs into ``out_dir`` (for ``include_path``)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    docs = heldout_documents()
    bpb = out / "mor_heldout_bpb.jsonl"
    mc = out / "mor_heldout_mc.jsonl"
    _write_if_changed(bpb, "".join(json.dumps(r) + "\n" for r in bpb_docs(docs)))
    _write_if_changed(mc, "".join(json.dumps(r) + "\n" for r in mc_items(docs)))
    _write_if_changed(out / "mor_heldout_bpb.yaml", _BPB_YAML.format(path=bpb.resolve()))
    _write_if_changed(out / "mor_heldout_mc.yaml", _MC_YAML.format(path=mc.resolve()))
    return out
