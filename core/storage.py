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
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["Location", "atomic_write", "is_uri"]


def is_uri(where: str | Path) -> bool:
    """``scheme://...`` other than ``file://``: a remote store."""
    text = str(where)
    return "://" in text and not text.startswith("file://")


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

    def local_copy(self, cache: Path) -> Path:
        """A local path holding this file: itself when local, else a download into
        ``cache`` (keyed by the URI; reused while the object's size is unchanged)."""
        if self.is_local:
            return Path(self.path)
        size = self.fs.get_file_info(self.path).size
        key = hashlib.blake2b(f"{self.uri}|{size}".encode(), digest_size=12).hexdigest()
        target = cache / f"{key}-{self.uri.rsplit('/', 1)[-1]}"
        if not target.is_file():
            cache.mkdir(parents=True, exist_ok=True)

            def download(f: BinaryIO) -> None:
                with self.fs.open_input_stream(self.path) as src:
                    while block := src.read(8 << 20):
                        f.write(block)

            atomic_write(target, download)
        return target

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

    def make_dirs(self) -> None:
        self.fs.create_dir(self.path, recursive=True)


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
