"""Where training text comes from: sources cut into work units, each read as a bounded stream.

A source ('default', files, folders, globs of .txt/.jsonl/.parquet, compressed .gz/.zst, or
'hf:NAME') is planned into ``Unit``s: a byte range of a plain text or JSON-lines file, a run of
row groups of a parquet file, a whole compressed file, or a whole hub dataset. ``documents``
streams one unit's documents in source order; memory is bounded by a block of bytes or a batch of
rows, never by the size of a file or of the corpus. Units are planned deterministically from the
files alone, so a unit's documents (and the shards ``trainers.data`` writes from them) are the
same however many workers run and however often a preparation is restarted.
"""

from __future__ import annotations

import codecs
import glob
import io
import itertools
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

from mor.corpus import default_corpus_documents
from mor.overrides import ConfigError

__all__ = [
    "SUFFIXES",
    "TXT_DOC_CHARS",
    "SkipCounts",
    "Unit",
    "documents",
    "plan_units",
    "resolve_files",
    "split_text",
]

SUFFIXES = (".txt", ".jsonl", ".parquet")
COMPRESSED = {".gz": "gzip", ".zst": "zstd"}
"""Compressed variants (.txt.gz, .jsonl.zst, ...), read through pyarrow's codecs."""
TXT_DOC_CHARS = 8000
"""Target size of one .txt document: small enough that a single-file corpus (TinyShakespeare)
still has many documents for the hash split, large enough to keep long-range context."""
BLOCK_BYTES = 1 << 20
"""Read size for text files: the memory a reader holds, whatever the size of the file."""
PARQUET_BATCH_ROWS = 1024
"""Rows per parquet read batch."""
CUT_WINDOW = 1 << 20
"""How far past a nominal unit boundary the planner looks for a line end to cut at."""

DecodeErrors = Literal["skip", "fail"]


@dataclass(frozen=True)
class Unit:
    """One independently readable piece of a source: the grain of parallelism and of resume."""

    kind: str
    """'default', 'txt', 'jsonl', 'parquet', 'hf', or 'capped' (all units in order, stopped at
    max_documents: a quick run's corpus, read by one task)."""
    path: str = ""
    """File (txt/jsonl/parquet) or 'hf:' name."""
    start: int = 0
    """First byte (txt/jsonl) or first row group (parquet)."""
    stop: int = -1
    """One past the last byte or row group; -1 is the end of the file."""
    codec: str | None = None
    """'gzip' or 'zstd' for a compressed file (read whole, from the start)."""


@dataclass
class SkipCounts:
    """What a unit dropped instead of failing, reported in the manifest and on the console."""

    undecodable: int = 0
    """Text blocks with invalid UTF-8 (bytes replaced) or JSON lines that did not parse."""
    missing_field: int = 0
    """Rows without a non-empty string in the text field."""
    columns: list[str] = field(default_factory=list)
    """Columns seen in rows that lacked the text field (to name them in an error)."""

    def to_dict(self) -> dict[str, int]:
        return {"undecodable": self.undecodable, "missing_field": self.missing_field}


# --------------------------------------------------------------------------- files


def _suffix(path: Path) -> tuple[str, str | None]:
    """('.jsonl', 'zstd') for x.jsonl.zst; ('.txt', None) for x.txt."""
    suffixes = [s.lower() for s in path.suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSED and len(suffixes) == 2:
        return suffixes[0], COMPRESSED[suffixes[-1]]
    return (suffixes[-1] if suffixes else ""), None


def resolve_files(source: str) -> list[Path]:
    """The sorted data files of a file, folder (searched recursively) or glob ``source``."""
    path = Path(source).expanduser()
    if any(c in source for c in "*?["):
        files = [Path(m) for m in glob.glob(str(path), recursive=True) if Path(m).is_file()]
    elif path.is_dir():
        # A folder may hold READMEs and licences next to the data: take only known types.
        files = [
            f
            for f in path.rglob("*")
            if f.is_file() and _suffix(f)[0] in SUFFIXES and not f.name.startswith(".")
        ]
    else:
        files = [path] if path.is_file() else []
    allowed = "/".join(SUFFIXES) + " (optionally .gz/.zst)"
    if not files:
        raise ConfigError(
            f"source: {source!r} matches no files; give 'default', an existing file, a folder "
            f"or glob of {allowed} files, or 'hf:NAME[:CONFIG]'"
        )
    for f in files:
        suffix, codec = _suffix(f)
        if suffix not in SUFFIXES or (codec and suffix == ".parquet"):
            raise ConfigError(
                f"source: unsupported file type {''.join(f.suffixes) or '(none)'!r} of "
                f"{str(f)!r}; allowed: {allowed}"
            )
    return sorted(f.resolve() for f in files)


def parse_hf(source: str) -> tuple[str, str | None]:
    name, _, config = source[len("hf:") :].partition(":")
    if not name:
        raise ConfigError(f"source: {source!r} names no dataset; use 'hf:NAME' or 'hf:NAME:CONFIG'")
    return name, config or None


# --------------------------------------------------------------------------- planning


def plan_units(source: str, unit_bytes: int, capped: bool = False) -> list[Unit]:
    """The units of ``source`` in corpus order. ``capped`` (max_documents set) folds them into
    one 'capped' unit, since the first N documents can only be counted in order."""
    if capped:
        return [Unit("capped", source)]
    if source == "default":
        return [Unit("default")]
    if source.startswith("hf:"):
        parse_hf(source)
        return [Unit("hf", source)]
    units: list[Unit] = []
    for f in resolve_files(source):
        suffix, codec = _suffix(f)
        kind = suffix[1:]
        if codec is not None:
            units.append(Unit(kind, str(f), codec=codec))
        elif kind == "parquet":
            units.extend(_parquet_units(f, unit_bytes))
        else:
            units.extend(_byte_units(f, kind, unit_bytes))
    return units


def _byte_units(path: Path, kind: str, unit_bytes: int) -> list[Unit]:
    size = path.stat().st_size
    cuts = [0]
    with open(path, "rb") as f:
        while cuts[-1] + unit_bytes < size:
            cut = _cut_after(f, cuts[-1] + unit_bytes, size, lines_only=kind == "jsonl")
            if cut >= size:
                break
            cuts.append(cut)
    cuts.append(size)
    return [Unit(kind, str(path), a, b) for a, b in itertools.pairwise(cuts) if b > a]


def _cut_after(f: BinaryIO, at: int, size: int, lines_only: bool) -> int:
    """A boundary at or after ``at``: just past a line end; for text, failing one within
    CUT_WINDOW, after whitespace, else at a UTF-8 character start (a line may be any length)."""
    f.seek(at)
    window = f.read(CUT_WINDOW)
    nl = window.find(b"\n")
    if nl >= 0:
        return at + nl + 1
    if lines_only:  # a JSON line cannot be cut: scan on (once per boundary, linear in total)
        pos = at + len(window)
        while pos < size:
            block = f.read(BLOCK_BYTES)
            nl = block.find(b"\n")
            if nl >= 0:
                return pos + nl + 1
            pos += len(block)
        return size
    space = max(window.rfind(b" "), window.rfind(b"\t"))
    if space >= 0:
        return at + space + 1
    i = 0
    while i < len(window) and window[i] & 0xC0 == 0x80:  # continuation bytes
        i += 1
    return at + i


def _parquet_units(path: Path, unit_bytes: int) -> list[Unit]:
    import pyarrow.parquet as pq

    meta = pq.ParquetFile(path).metadata
    units, first, size = [], 0, 0
    for g in range(meta.num_row_groups):
        size += meta.row_group(g).total_byte_size
        if size >= unit_bytes:
            units.append(Unit("parquet", str(path), first, g + 1))
            first, size = g + 1, 0
    if first < meta.num_row_groups or not units:
        units.append(Unit("parquet", str(path), first, meta.num_row_groups))
    return units


# --------------------------------------------------------------------------- reading


def documents(
    unit: Unit,
    text_field: str,
    errors: DecodeErrors,
    max_chars: int,
    skips: SkipCounts,
    cap: int | None = None,
) -> Iterator[str]:
    """The non-empty documents of ``unit`` in order, none longer than ``max_chars`` (longer ones
    are cut at paragraph, line or word ends). Drops are counted in ``skips``."""
    if unit.kind == "capped":
        yield from _capped(unit.path, text_field, errors, max_chars, skips, cap)
        return
    if unit.kind == "default":
        raw: Iterable[str] = default_corpus_documents()
    elif unit.kind == "txt":
        raw = split_stream(_text_blocks(unit, errors, skips), TXT_DOC_CHARS)
    elif unit.kind == "jsonl":
        raw = _jsonl_texts(unit, text_field, errors, skips)
    elif unit.kind == "parquet":
        raw = _parquet_texts(unit, text_field, skips)
    else:
        raw = _hf_texts(unit, text_field, skips)
    for doc in raw:
        if not doc.strip():
            continue
        # Lone surrogates (possible in docstrings and JSON escapes) would crash the tokenizer.
        doc = doc.encode("utf-8", "replace").decode("utf-8")
        if len(doc) <= max_chars:
            yield doc
        else:  # a pathological document costs what its length costs, once
            yield from split_stream([doc], max_chars)


def _capped(
    source: str, text_field: str, errors: DecodeErrors, max_chars: int, skips: SkipCounts, cap: int
) -> Iterator[str]:
    n = 0
    for unit in plan_units(source, 1 << 62):
        for doc in documents(unit, text_field, errors, max_chars, skips):
            yield doc
            n += 1
            if n >= cap:
                return


def _open(unit: Unit) -> BinaryIO:
    if unit.codec is None:
        return open(unit.path, "rb")
    import pyarrow as pa

    return pa.CompressedInputStream(pa.OSFile(unit.path), unit.codec)


def _byte_blocks(unit: Unit) -> Iterator[bytes]:
    with _open(unit) as f:
        if unit.codec is None:
            f.seek(unit.start)
        left = None if unit.stop < 0 or unit.codec else unit.stop - unit.start
        while left is None or left > 0:
            block = f.read(BLOCK_BYTES if left is None else min(BLOCK_BYTES, left))
            if not block:
                return
            if left is not None:
                left -= len(block)
            yield block


def _text_blocks(unit: Unit, errors: DecodeErrors, skips: SkipCounts) -> Iterator[str]:
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    offset = unit.start
    for block in itertools.chain(_byte_blocks(unit), [None]):  # None: the end (flush)
        try:
            yield decoder.decode(block or b"", final=block is None)
        except UnicodeDecodeError as exc:
            if errors == "fail":
                raise ConfigError(
                    f"data.decode_errors: {unit.path} is not UTF-8 near byte "
                    f"{offset + exc.start}; fix the file or set data.decode_errors=skip"
                ) from None
            skips.undecodable += 1  # this block's bad bytes become U+FFFD
            decoder = codecs.getincrementaldecoder("utf-8")("replace")
            yield decoder.decode(block or b"", final=block is None)
            decoder = codecs.getincrementaldecoder("utf-8")("strict")
        offset += len(block or b"")


def _lines(unit: Unit) -> Iterator[tuple[int, bytes]]:
    """(line number within the unit, line bytes): lines are read one at a time."""
    with _open(unit) as f:
        if unit.codec is None:
            f.seek(unit.start)
        reader = io.BufferedReader(f) if unit.codec else f
        pos, n = unit.start, 0
        while unit.stop < 0 or unit.codec or pos < unit.stop:
            line = reader.readline()
            if not line:
                return
            pos, n = pos + len(line), n + 1
            yield n, line


def _jsonl_texts(
    unit: Unit, text_field: str, errors: DecodeErrors, skips: SkipCounts
) -> Iterator[str]:
    for n, line in _lines(unit):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:  # UnicodeDecodeError is a ValueError too
            if errors == "fail":
                where = f"line {n}" + (f" after byte {unit.start}" if unit.start else "")
                raise ConfigError(
                    f"data.decode_errors: {unit.path} {where} is not a UTF-8 JSON object "
                    f"({type(exc).__name__}); fix it or set data.decode_errors=skip"
                ) from None
            skips.undecodable += 1
            continue
        yield from _row_text(row, text_field, skips)


def _row_text(row: Any, text_field: str, skips: SkipCounts) -> Iterator[str]:
    value = row.get(text_field) if isinstance(row, dict) else None
    if isinstance(value, str) and value.strip():
        yield value
    else:
        skips.missing_field += 1
        if isinstance(row, dict) and not skips.columns:
            skips.columns = sorted(map(str, row))


def _parquet_texts(unit: Unit, text_field: str, skips: SkipCounts) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(unit.path)
    names = pf.schema_arrow.names
    if text_field not in names:
        raise ConfigError(
            f"data.text_field: {text_field!r} is not a column of {unit.path}; columns: {names}"
        )
    groups = list(range(unit.start, pf.metadata.num_row_groups if unit.stop < 0 else unit.stop))
    for batch in pf.iter_batches(PARQUET_BATCH_ROWS, row_groups=groups, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                yield value
            else:
                skips.missing_field += 1


def _hf_texts(unit: Unit, text_field: str, skips: SkipCounts) -> Iterator[str]:
    import datasets  # slow import; only hub sources need it

    name, config = parse_hf(unit.path)
    # Streaming: rows arrive in batches, nothing is materialised whatever the dataset's size.
    for row in datasets.load_dataset(name, config, split="train", streaming=True):
        yield from _row_text(row, text_field, skips)


# --------------------------------------------------------------------------- text → documents

_PARA_BREAK = re.compile(r"\n(?:[ \t]*\n)+")


def split_text(text: str, doc_chars: int = TXT_DOC_CHARS) -> list[str]:
    """Cut plain text into documents of about ``doc_chars``: blank-line separated paragraphs
    are grouped, a longer paragraph is cut at line ends, a longer line at a word end."""
    return list(split_stream([text], doc_chars))


def split_stream(blocks: Iterable[str], doc_chars: int) -> Iterator[str]:
    """``split_text`` over text arriving in blocks; holds at most a few documents' worth."""
    cur: list[str] = []
    size = 0
    for para in _paragraphs(blocks, doc_chars):
        para = para.replace("\r\n", "\n").strip("\n")  # keep indentation (verse, code)
        if not para.strip():
            continue
        pieces = [para]
        if len(para) > doc_chars:
            pieces = _group(_cut_lines(para, doc_chars), doc_chars, "\n")
        for piece in pieces:
            if cur and size + len(piece) > doc_chars:
                yield "\n\n".join(cur)
                cur, size = [], 0
            cur.append(piece)
            size += len(piece) + 2
    if cur:
        yield "\n\n".join(cur)


def _paragraphs(blocks: Iterable[str], doc_chars: int) -> Iterator[str]:
    buf = ""
    for block in blocks:
        buf += block.replace("\r\n", "\n")
        parts = _PARA_BREAK.split(buf)
        buf = parts.pop()  # may continue in the next block
        yield from parts
        if len(buf) > 4 * doc_chars:  # one huge paragraph: release its complete lines
            cut = buf.rfind("\n", 0, len(buf) - doc_chars)
            cut = cut if cut > 0 else len(buf) - doc_chars
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


def _cut_lines(para: str, limit: int) -> list[str]:
    """The lines of ``para``, any line over ``limit`` cut at a space (or hard, if none)."""
    out: list[str] = []
    for line in para.split("\n"):
        while len(line) > limit:
            cut = line.rfind(" ", limit // 2, limit)
            cut = cut + 1 if cut > 0 else limit
            out.append(line[:cut])
            line = line[cut:]
        out.append(line)
    return out


def _group(pieces: list[str], limit: int, sep: str) -> list[str]:
    out: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in pieces:
        if cur and size + len(piece) > limit:
            out.append(sep.join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece) + len(sep)
    if cur:
        out.append(sep.join(cur))
    return out
