"""The embedded default corpus and the deterministic train/validation split (pure Python).

Every machine with Python has it: the pydoc help topics plus the docstrings of the standard
library's own modules (read with ``ast``, never imported). Both the trainers (training data)
and the evals (held-out tasks) use it, so it lives here, below both.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sysconfig
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

_SKIP_DIRS = frozenset(
    {"test", "tests", "site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo"}
)
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def default_corpus_documents() -> list[str]:
    """The embedded corpus: pydoc help topics, then one document per stdlib module holding its
    docstrings in source order. About 2.3 MB of English; deterministic for a Python version."""
    return list(_default_corpus())


@lru_cache(maxsize=1)
def _default_corpus() -> tuple[str, ...]:
    # Parsing ~700 files takes seconds, so one process does it once.
    docs: list[str] = []
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some minimal distributions strip pydoc_data
        topics = {}
    docs.extend(topics[k] for k in sorted(topics))
    root = Path(sysconfig.get_paths()["stdlib"])
    paths: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune here rather than filter later: site-packages can hold far more than the stdlib.
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(".")]
        paths.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    for path in sorted(paths):
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):
            continue
        text = "\n\n".join(_docstrings(tree))
        if text.strip():
            docs.append(text)
    return tuple(docs)


def _docstrings(node: ast.AST) -> Iterator[str]:
    # Depth-first in source order, descending into if/try blocks that define functions too.
    if isinstance(node, _DOC_NODES) and (doc := ast.get_docstring(node)):
        yield doc
    for child in ast.iter_child_nodes(node):
        yield from _docstrings(child)


def _is_val(doc: str, val_fraction: float) -> bool:
    digest = hashlib.blake2b(doc.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") < val_fraction * 2.0**64


def split_documents(documents: list[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """(train, val) by a hash of each document's text, keeping the corpus order."""
    flags = [_is_val(d, val_fraction) for d in documents]
    train = [d for d, v in zip(documents, flags) if not v]
    val = [d for d, v in zip(documents, flags) if v]
    return train, val
