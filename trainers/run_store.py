"""Where one training run's files live, whatever the storage is: one home for every path.

``storage_path`` is a folder or an object-store URI (``core.storage.Location``); every path below
is derived here, as a ``Location`` or as a string Ray accepts, never by joining a URI with
``pathlib`` (which turned ``s3://b/k`` into a local folder named ``s3:``).

Persisted under the storage path, reachable from every node:

- ``<storage>/ray/<name>/``: Ray Train's run state and checkpoints (Ray writes them);
- ``<storage>/runs/<name>/``: the run's record: its MLflow run id (``RUN_ID_FILE``), the metric
  spool while MLflow is unreachable, worker pid files and fault-injection markers, and
  ``export/``, the trained model, copied there by the driver from the final checkpoint.

On the driver's machine only (``core.storage.local_mirror``: the same folder when the storage is
local): the writer lock, which names a local process, and a download of the export for MLflow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.storage import Location, local_mirror

RAY_SUBDIR = "ray"
RUNS_SUBDIR = "runs"


@dataclass(frozen=True)
class RunStore:
    storage: Location
    """The storage path."""
    name: str
    """The run's name (``TrainConfig.name``)."""

    @classmethod
    def of(cls, cfg: Any) -> RunStore:
        """The store of a ``TrainConfig`` (its storage path is already absolute or a URI)."""
        return cls(Location.parse(cfg.storage_path), cfg.name)

    @property
    def ray_storage(self) -> str:
        """Ray Train's ``RunConfig.storage_path``: Ray keeps ``<this>/<name>/`` per run."""
        return self.storage.child(RAY_SUBDIR).uri

    @property
    def home(self) -> Location:
        """The run's own persisted folder."""
        return self.storage.child(RUNS_SUBDIR, self.name)

    @property
    def export(self) -> Location:
        return self.home.child("export")

    @property
    def local_dir(self) -> Path:
        """This machine's folder of the run: its writer lock (``home`` itself when local)."""
        return local_mirror(self.storage.uri) / RUNS_SUBDIR / self.name

    @property
    def ray_run_dir(self) -> Path | None:
        """Ray Train's folder of this run's checkpoints when it is local (the driver tidies
        torn state there); None on object storage, where Ray's own record is used."""
        if not self.storage.is_local:
            return None
        return Path(self.storage.path) / RAY_SUBDIR / self.name


def save_export(checkpoint: Any, store: RunStore) -> Location:
    """Copy ``export/`` of Ray's final checkpoint (local or remote) to the run's export
    folder; returns it. Raises ``FileNotFoundError`` when the checkpoint holds none."""
    import pyarrow.fs as pafs

    src = f"{checkpoint.path.rstrip('/')}/export"
    if checkpoint.filesystem.get_file_info(src).type != pafs.FileType.Directory:
        raise FileNotFoundError(src)
    store.export.copy_tree_from(checkpoint.filesystem, src)
    return store.export
