"""One storage abstraction: a local folder or an object-store URI, through ``pyarrow.fs``.

``Location.parse("s3://bucket/prefix")`` or ``Location.parse("/data/x")`` gives a location whose
children are joined as strings on the filesystem's own path, never as ``pathlib.Path`` (which
would turn ``s3://b/k`` into a local folder named ``s3:``). Object stores are what Ray Train and
Tune accept as ``storage_path`` (S3, GCS, and S3-compatible stores such as MinIO): pyarrow reads
the standard environment, ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` or an instance role, so no credential is ever passed or logged here.

Writes are atomic on both kinds: a local file goes through a temp file and a rename; an object
appears only when its upload completes. ``local_copy`` gives a local path for reading (the
file itself, or a download into a cache folder), so readers can memory-map either kind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "Location",
    "atomic_write",
    "is_uri",
    "local_cache_root",
    "local_mirror",
    "resolve_storage",
]


def is_uri(where: str | Path) -> bool:
    """``scheme://...`` other than ``file://``: a remote store."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


def resolve_storage(where: str | Path) -> str:
    """A storage path as every process must see it: an absolute local path (a trial runs in its
    own working directory), or an object-store URI unchanged (never through ``pathlib``)."""
    return Location.parse(where).uri


def local_cache_root() -> Path:
    """This machine's cache folder (downloads, tokenizers, driver-only state of runs kept in
    an object store): $MOR_CACHE_DIR, else ~/.cache/mor-platform."""
    return Path(os.environ.get("MOR_CACHE_DIR") or "~/.cache/mor-platform").expanduser()


def local_mirror(where: str | Path) -> Path:
    """A local folder standing for ``where``: itself when local; for an object-store URI, a
    folder under the cache named after it (``s3://b/p`` → ``<cache>/stores/s3/b/p``). For what
    must live on this machine's disk whatever the storage is: writer locks, a driver's own
    bookkeeping, downloads."""
    loc = Location.parse(where)
    if loc.is_local:
        return Path(loc.path)
    scheme = loc.uri.split("://", 1)[0]
    return local_cache_root() / "stores" / scheme / loc.path.strip("/")


@dataclass(frozen=True)
class Location:
    """A file or folder on a local disk or in an object store."""

    uri: str
    """What the user wrote, normalised: an absolute local path, or ``scheme://bucket/key``."""
    fs: Any
    """The ``pyarrow.fs.FileSystem`` holding it."""
    path: str
    """Its path on ``fs`` (no scheme)."""

    @classmethod
    def parse(cls, where: str | Path) -> Location:
        import pyarrow.fs as pafs

        text = str(where)
        if not is_uri(text):
            local = os.path.abspath(os.path.expanduser(text.removeprefix("file://")))
            return cls(local, pafs.LocalFileSystem(), local)
        fs, path = pafs.FileSystem.from_uri(text.rstrip("/"))
        return cls(text.rstrip("/"), fs, path)

    @property
    def is_local(self) -> bool:
        return not is_uri(self.uri)

    def child(self, *parts: str) -> Location:
        rel = "/".join(p.strip("/") for p in parts if p)
        return Location(f"{self.uri}/{rel}", self.fs, f"{self.path}/{rel}")

    def __str__(self) -> str:
        return self.uri

    # ------------------------------------------------------------------ queries

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path).type == pafs.FileType.File

    def names(self) -> list[str]:
        """Names directly inside this folder (empty when it does not exist)."""
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.path, allow_not_found=True)
        return sorted(info.base_name for info in self.fs.get_file_info(selector))

    # ------------------------------------------------------------------ reading

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def read_json(self) -> Any:
        return json.loads(self.read_text())

    def local_copy(self, cache: Path) -> Path:
        """A local path holding this file: itself when local, else a download into
        ``cache`` (keyed by the URI; reused while the object's size is unchanged)."""
        if self.is_local:
            return Path(self.path)
        size = self.fs.get_file_info(self.path).size
        key = hashlib.blake2b(f"{self.uri}|{size}".encode(), digest_size=12).hexdigest()
        target = cache / f"{key}-{self.uri.rsplit('/', 1)[-1]}"
        if not target.is_file():
            atomic_write(target, self._copy_into)
        return target

    def local_folder(self, cache: Path | None = None) -> Path:
        """A local folder holding this folder's files: itself when local, else a download into
        ``cache`` (default: this location's ``local_mirror``), refreshed file by file when a
        file's size or modification time changed (a rerun rewrites an export's weights at the
        same size). For an export read by an evaluation on any node."""
        if self.is_local:
            return Path(self.path)
        import pyarrow.fs as pafs

        target = cache or local_mirror(self.uri)
        selector = pafs.FileSelector(self.path, recursive=True)
        infos = [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]
        if not infos:
            raise FileNotFoundError(f"{self.uri}: no such folder, or it is empty")
        for info in infos:
            local = target / info.path[len(self.path) :].lstrip("/")
            stamp = info.mtime_ns or 0
            if local.is_file() and (local.stat().st_size, local.stat().st_mtime_ns) == (
                info.size,
                stamp,
            ):
                continue
            src = Location(f"{self.uri}{info.path[len(self.path) :]}", self.fs, info.path)
            atomic_write(local, src._copy_into)
            os.utime(local, ns=(stamp, stamp))  # the remote time: what the next call compares
        return target

    def _copy_into(self, f: BinaryIO) -> None:
        with self.fs.open_input_stream(self.path) as src:
            while block := src.read(8 << 20):
                f.write(block)

    # ------------------------------------------------------------------ writing

    def write(self, write: Callable[[BinaryIO], None]) -> None:
        """Write this file atomically with ``write(file)``."""
        if self.is_local:
            atomic_write(Path(self.path), write)
            return
        with self.fs.open_output_stream(self.path) as f:  # visible once the upload completes
            write(f)

    def write_bytes(self, data: bytes) -> None:
        self.write(lambda f: f.write(data))

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode("utf-8"))

    def write_json(self, data: Any) -> None:
        self.write_text(json.dumps(data, indent=2, default=str))

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)

    def delete(self) -> None:
        """Remove this file (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    def delete_tree(self) -> None:
        """Remove this folder and everything in it (nothing when it does not exist)."""
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.path).type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)

    def copy_tree_from(self, src_fs: Any, src_path: str) -> None:
        """Replace this folder with a copy of ``src_path`` on ``src_fs`` (e.g. a folder inside a
        Ray checkpoint, local or remote). Files are written whole (uploads appear complete)."""
        import pyarrow.fs as pafs

        self.delete_tree()
        self.make_dirs()
        pafs.copy_files(
            src_path, self.path, source_filesystem=src_fs, destination_filesystem=self.fs
        )

    def check_writable(self) -> None:
        """Write and remove a small probe file: ``OSError`` when this folder cannot take one."""
        probe = self.child(f".mor-write-check-{os.getpid()}")
        self.make_dirs()
        probe.write_bytes(b"\0" * 4096)
        probe.delete()


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write a local file through a temp file in the same folder, then rename it."""
    # A crash leaves only a .tmp- file behind, never a truncated file under the final name.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
