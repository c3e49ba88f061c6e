"""Where one sweep's files live, whatever the storage is (the sweep's side of
``trainers.run_store``, which places each trial's training run).

Persisted under the storage path (a folder or an object-store URI):

- ``<storage>/tune/<name>/``: Tune's experiment state (what ``mor sweep resume`` restores);
- ``<storage>/sweeps/<name>/``: the sweep's record: its MLflow run id, ``spec.json``, and at the
  end ``summary.csv``, ``summary.json`` and ``report/``.

The driver's own bookkeeping (writer lock, skipped draws, ASHA rungs and stops, the report
being built) lives in ``state_dir`` on the driver's machine: the same folder as ``home`` when
the storage is local, a folder under the local cache mirroring the URI otherwise. On object
storage each bookkeeping file is copied to ``home/state/`` whenever it changes (``keep``) and a
resumed driver starts from those copies (``restore``): `mor sweep resume` works from a machine
that never saw the sweep (Tune's own searcher state is in ``tune/<name>``). What a reader needs
(summary, report) is published to ``home`` at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from core.storage import Location, local_mirror, resolve_storage

TUNE_SUBDIR = "tune"
SWEEPS_SUBDIR = "sweeps"
STATE_SUBDIR = "state"


@dataclass(frozen=True)
class SweepStore:
    storage: Location
    """The storage path."""
    name: str
    """The sweep's name."""

    @classmethod
    def of(cls, storage_path: str, name: str) -> SweepStore:
        return cls(Location.parse(resolve_storage(storage_path)), name)

    @property
    def tune_storage(self) -> str:
        """Tune's ``RunConfig.storage_path``."""
        return self.storage.child(TUNE_SUBDIR).uri

    @property
    def experiment(self) -> str:
        """Tune's experiment folder (``Tuner.restore``)."""
        return self.storage.child(TUNE_SUBDIR, self.name).uri

    @property
    def home(self) -> Location:
        return self.storage.child(SWEEPS_SUBDIR, self.name)

    @property
    def state_dir(self) -> Path:
        """The driver's local folder of the sweep."""
        return local_mirror(self.storage.uri) / SWEEPS_SUBDIR / self.name

    @property
    def eval_work_dir(self) -> Path:
        """This node's folder of materialised lm-eval task files."""
        return local_mirror(self.storage.uri) / "eval_tasks"

    def publish(self, files: list[Path]) -> None:
        """Copy files of ``state_dir`` (summary, report) to ``home`` when they differ (on
        object storage); on a local disk they are already there."""
        if self.storage.is_local:
            return
        for f in files:
            rel = f.relative_to(self.state_dir).as_posix()
            self.home.child(rel).write_bytes(f.read_bytes())

    def keep(self, path: Path) -> None:
        """Copy one bookkeeping file of ``state_dir`` to ``home/state/`` (object storage only;
        on a local disk ``state_dir`` is ``home``)."""
        if not self.storage.is_local:
            self.home.child(STATE_SUBDIR, path.name).write_bytes(path.read_bytes())

    def restore(self) -> None:
        """A resumed driver's ``state_dir`` from ``home/state/`` (object storage only): the
        bookkeeping its killed predecessor kept, wherever that one ran."""
        if self.storage.is_local:
            return
        kept = self.home.child(STATE_SUBDIR)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for name in kept.names():
            (self.state_dir / name).write_bytes(kept.child(name).read_bytes())

    def forget(self) -> None:
        """A new search starts clean: the kept bookkeeping of an earlier one is removed."""
        if not self.storage.is_local:
            self.home.child(STATE_SUBDIR).delete_tree()
