"""Embedded default tasks, built from the held-out split of the default corpus (no files needed).

- ``mor_heldout_bpb``: bits-per-byte (and word/byte perplexity) of held-out documents, by
  ``loglikelihood_rolling`` (the same metrics lm-eval's wikitext task reports).
- ``mor_heldout_mc``: 4-way multiple choice: a passage of held-out text, and the true next
  span against three word-order scrambles of it. Even tiny CPU models beat chance on it, and
  deeper/better models beat it more, so configurations separate.

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
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: byte_perplexity
    aggregation: weighted_perplexity
    higher_is_better: false
  - metric: bits_per_byte
    aggregation: bits_per_byte
    higher_is_better: false
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


def _shuffled(span: str, rng: random.Random) -> str | None:
    """The span's words in another order (None when it has too few distinct orders)."""
    words = span.split()
    if len(set(words)) < 4:
        return None
    for _ in range(20):
        perm = words[:]
        rng.shuffle(perm)
        if perm != words:
            return " ".join(perm)
    return None


def mc_items(docs: list[str], seed: int = 0) -> list[dict[str, object]]:
    """A passage, its true continuation, and three word-order scrambles of that continuation.

    Every choice holds the same words, so only the model's sense of fluent, in-context English
    separates them: a unigram model is at chance (25%), a model that learned word order and
    context beats it, and better models beat it more.
    """
    rng = random.Random(seed)
    items = []
    for doc in docs:
        text = _clean(doc)
        step = MC_CONTEXT_CHARS + MC_SPAN_CHARS
        for start in range(0, len(text) - step, step):
            ctx = _cut_at_word(text[start:], MC_CONTEXT_CHARS)
            rest = text[start + len(ctx) :].lstrip()
            span = _cut_at_word(rest, MC_SPAN_CHARS)
            wrong: list[str] = []
            for _ in range(10):
                cand = _shuffled(span, rng)
                if cand and cand not in wrong and cand != span:
                    wrong.append(cand)
                if len(wrong) == 3:
                    break
            if len(span) < 20 or len(wrong) < 3:
                continue
            choices = [" " + span] + [" " + w for w in wrong]
            order = list(range(4))
            rng.shuffle(order)
            items.append(
                {"context": ctx, "choices": [choices[i] for i in order], "label": order.index(0)}
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
