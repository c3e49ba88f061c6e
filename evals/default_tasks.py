"""Embedded default tasks, built from the held-out split of the default corpus (no files needed).

- ``mor_heldout_bpb``: bits-per-byte (and word/byte perplexity) of held-out documents, by
  ``loglikelihood_rolling`` (the same metrics lm-eval's wikitext task reports). The headline
  metric at tiny scale: it separates models far beyond noise.
- ``mor_heldout_mc``: 4-way multiple choice: ~300 characters of held-out text, then its true
  next ~60 characters against three copies of them with one pair of adjacent words swapped
  (same words, same length: acc and acc_norm agree). Every non-overlapping span of the
  held-out split is an item (1,128), in a seeded random order, so any ``limit`` samples every
  document.

How much signal the choice task carries (issue #15, measured 2026-12-02 on four tiny models of
8 unrolled layers, d=128: vanilla V and MoR-EC middle-cycle N_r=3 M, each at 1e12 (V1, M1) and
4e12 (V4, M4) training FLOPs). Accuracy, and paired differences on the same items with z =
difference / its standard error. scramble: three word-order scrambles of the span; swap: three
copies with one adjacent pair swapped; other-doc: spans from other documents; -181: one item
per 360 characters (before), -all: every span:

| design | n | V1 | V4 | M1 | M4 | V4-V1 (z) | M1-V1 (z) | M4-V4 (z) |
| --- | --- | --- | --- | --- | --- | --- | --- | --- |
| scramble-181 | 181 | 0.613 | 0.895 | 0.735 | | 0.282 (7.6) | 0.122 (3.2) | |
| scramble-all | 1123 | 0.643 | 0.907 | 0.733 | 0.914 | 0.264 (18) | 0.090 (5.8) | 0.007 (0.9) |
| swap-all (now) | 1128 | 0.421 | 0.661 | 0.489 | 0.709 | 0.239 (14) | 0.068 (4.2) | 0.049 (3.8) |
| other-doc-all | 1164 | 0.260 | 0.280 | 0.259 | | 0.021 (2.6) | 0.001 (0.2) | |
| bits per byte | 48 | 2.804 | 2.376 | 2.682 | 2.290 | -0.428 (28) | -0.122 (22) | -0.087 (12) |

More items is what shrinks the noise (181 → 1,128: the standard error of a difference from
~0.037 to ~0.015). Scrambles saturate: once models pass ~0.9 they stop separating them (z 0.9 at
4e12, where bits per byte still gives 12); one swapped pair is harder, keeps accuracy in
0.4–0.7 and separates both pairs. Continuations taken from other documents are at chance for
models this small (they do not use the context). Bits per byte stays the more sensitive
measure (z 12–22 against 4), hence the quickstart's headline; this task is its second panel.
Before, the choices also began with a space that lm-eval's own target delimiter doubled
(0.04–0.05 lower scores, on a context no training text has).

The held-out split is the one the trainers never train on (``mor.corpus.split_documents``
with the default 5% validation fraction).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sys
from functools import lru_cache
from pathlib import Path

from core.storage import local_cache_root
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
  version: 2.0
"""


def heldout_documents() -> list[str]:
    """The default corpus's held-out documents (never trained on), the source of every default
    task, the held-out NLL and the routing analysis."""
    return list(_heldout())


@lru_cache(maxsize=1)
def _heldout() -> tuple[str, ...]:
    # Reading the corpus parses the standard library (~10 s, per process): its held-out part
    # (~100 KB) is kept in the local cache, as JSON, under a key of what decides it.
    path = local_cache_root() / "heldout" / f"{_source_key()}.json"
    try:
        return tuple(json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError):
        pass
    _, val = split_documents(default_corpus_documents(), VAL_FRACTION)
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_if_changed(path, json.dumps(val))
    return tuple(val)


def _source_key() -> str:
    """What decides the held-out documents, cheaply: the Python (its standard library is the
    corpus; ``trainers.data`` keys the training data the same way) and the code that builds
    the corpus and splits it."""
    import mor.corpus

    digest = hashlib.sha256(f"{sys.version}|{VAL_FRACTION}".encode())
    digest.update(Path(mor.corpus.__file__).read_bytes())
    return digest.hexdigest()[:16]


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


def _swaps(span: str, rng: random.Random) -> list[str] | None:
    """Three distinct copies of the span, each with one pair of adjacent (different) words
    swapped (None when the span has fewer than three such pairs)."""
    words = span.split()
    pairs = [i for i in range(len(words) - 1) if words[i] != words[i + 1]]
    if len(pairs) < 3:
        return None
    wrong: list[str] = []
    for i in rng.sample(pairs, len(pairs)):
        swapped = words[:]
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        cand = " ".join(swapped)
        if cand != span and cand not in wrong:
            wrong.append(cand)
        if len(wrong) == 3:
            return wrong
    return None


def _spans(text: str) -> list[tuple[str, str]]:
    """(context, span) for every non-overlapping ~MC_SPAN_CHARS span that has
    ~MC_CONTEXT_CHARS of text before it; both start and end at word boundaries."""
    out, pos = [], MC_CONTEXT_CHARS
    while pos + MC_SPAN_CHARS < len(text):
        if text[pos - 1] != " ":  # move to the start of the next word
            nxt = text.find(" ", pos)
            if nxt < 0:
                break
            pos = nxt + 1
            continue
        before = text[pos - MC_CONTEXT_CHARS : pos - 1]
        span = _cut_at_word(text[pos:], MC_SPAN_CHARS)
        out.append((before[before.find(" ") + 1 :], span))
        pos += len(span) + 1
    return out


def mc_items(docs: list[str], seed: int = 0) -> list[dict[str, object]]:
    """A passage, its true continuation, and three copies of that continuation with one pair
    of adjacent words swapped, for every span of ``docs`` (see ``_spans``), in a seeded
    random order.

    Every choice holds the same words, so only the model's sense of fluent, in-context English
    separates them: a unigram model is at chance (25%), a model that learned word order beats
    it, and better models beat it more; a single swap is local, so the task does not saturate
    as soon as whole-span scrambles do (module docstring). Choices carry no leading space:
    lm-eval joins context and choice with its target delimiter, a space.
    """
    rng = random.Random(seed)
    items = []
    for doc in docs:
        for ctx, span in _spans(_clean(doc)):
            wrong = _swaps(span, rng) if len(span) >= 20 else None
            if wrong is None:
                continue
            choices = [span, *wrong]
            order = list(range(4))
            rng.shuffle(order)
            items.append(
                {"context": ctx, "choices": [choices[i] for i in order], "label": order.index(0)}
            )
    rng.shuffle(items)  # any `limit` then samples every document, not the first few
    return items


def _write_if_changed(path: Path, text: str) -> None:
    """Write ``text`` unless the file already holds it; whole (a temporary file renamed), so
    a reader never sees half of it."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def prepare_default_tasks(out_dir: str | Path) -> Path:
    """Write the default tasks' data and YAMLs into a folder of ``out_dir`` named by their
    content (for ``include_path``): evaluations running at once on one machine, from other
    sweeps or other versions of the code, never read each other's files."""
    docs = heldout_documents()
    data = {
        "mor_heldout_bpb.jsonl": "".join(json.dumps(r) + "\n" for r in bpb_docs(docs)),
        "mor_heldout_mc.jsonl": "".join(json.dumps(r) + "\n" for r in mc_items(docs)),
    }
    digest = hashlib.sha256()
    for text in [*data.values(), _BPB_YAML, _MC_YAML]:
        digest.update(text.encode())
    out = Path(out_dir) / digest.hexdigest()[:16]
    out.mkdir(parents=True, exist_ok=True)
    for name, text in data.items():
        _write_if_changed(out / name, text)
    bpb, mc = out / "mor_heldout_bpb.jsonl", out / "mor_heldout_mc.jsonl"
    _write_if_changed(out / "mor_heldout_bpb.yaml", _BPB_YAML.format(path=bpb.resolve()))
    _write_if_changed(out / "mor_heldout_mc.yaml", _MC_YAML.format(path=mc.resolve()))
    return out
