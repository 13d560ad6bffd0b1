"""Where everything of one run lives, and how files are written there without ever being half-written.

Layout of a run directory::

    RUN_DIR/
      config.json              resolved training config (models.training.TrainConfig as JSON)
      checkpoints/last.pt      written atomically every epoch
      checkpoints/best.pt      written atomically when test accuracy improves
      metrics.csv              one row per epoch
      train.done               marker: training finished
      attacks/manifest.json    what was attacked, how, with which versions (see attacks.runner)
      attacks/records/<evaluation-id>/shard-NNNNN.parquet   per-sample records (attacks.records)
      report/                  index.html, report.md, summary.csv, summary.json, figures/
      .lock                    held while a command writes the run (below); absent otherwise

:class:`RunDir` is the one owner of those paths and of reading the run's JSON files: other modules ask it for a
path or a parsed file and never build run paths or parse run files themselves. It sits on the ground floor
(``robustness.core``) and imports nothing else of the project but the typed errors, the writer lock and the file
helpers.

The writer lock (``RunDir.writing``) is :mod:`robustness.core.lock`'s; atomic writes and the one-line OS errors are
:mod:`robustness.core.files`'s.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from robustness.core.errors import RunDirError
from robustness.core.files import is_temporary
from robustness.core.lock import writer_lock

#: what the suite writes at the top of a run directory (the layout above), besides atomic_write's temporary files
RUN_ENTRIES = frozenset({"config.json", "checkpoints", "metrics.csv", "train.done", "attacks", "report", ".lock"})


@dataclass(frozen=True)
class RunDir:
    """Paths inside one run directory."""

    root: Path

    @classmethod
    def at(cls, path: str | os.PathLike[str]) -> "RunDir":
        return cls(Path(path))

    @property
    def name(self) -> str:
        return self.root.resolve().name

    @property
    def config(self) -> Path:
        return self.root / "config.json"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last_checkpoint(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best_checkpoint(self) -> Path:
        return self.checkpoints / "best.pt"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.csv"

    @property
    def train_done(self) -> Path:
        return self.root / "train.done"

    @property
    def attacks(self) -> Path:
        return self.root / "attacks"

    @property
    def manifest(self) -> Path:
        return self.attacks / "manifest.json"

    @property
    def records(self) -> Path:
        return self.attacks / "records"

    @property
    def worst_case(self) -> Path:
        return self.attacks / "worst_case.parquet"

    @property
    def report(self) -> Path:
        return self.root / "report"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def writing(self, command: str) -> contextlib.AbstractContextManager[None]:
        """Hold this run's writer lock while the ``with`` body runs (``command``, e.g. ``"attack"``, names the holder
        in a second writer's error). Creates the directory when it does not exist (and removes it again if the body
        left it empty). Re-entrant in one process; see the module docstring for ranks and workers."""
        return writer_lock(self.lock, command)

    def shard(self, evaluation_id: str, batch: int) -> Path:
        """The Parquet shard of one evaluation's batch."""
        return self.records / evaluation_id / f"shard-{batch:05d}.parquet"

    def foreign_entries(self) -> list[Path]:
        """What the suite did not write at the top of this run directory (anything outside :data:`RUN_ENTRIES`,
        and every symbolic link): ``--force`` must never delete it. [] when the directory does not exist."""
        if not self.root.is_dir() or self.root.is_symlink():
            return [self.root] if self.root.is_symlink() else []
        return sorted(p for p in self.root.iterdir()
                      if p.is_symlink() or not (p.name in RUN_ENTRIES or is_temporary(p.name)))

    def looks_like_run(self) -> bool:
        """Whether this could only be a run directory the suite wrote: a real directory holding nothing but
        :data:`RUN_ENTRIES` (possibly only the ``.lock`` a ``kill -9`` left behind)."""
        return self.root.is_dir() and not self.root.is_symlink() and not self.foreign_entries()

    def has_records(self) -> bool:
        """Whether any attack record shard exists."""
        return self.records.is_dir() and any(self.records.rglob("*.parquet"))

    def require(self) -> "RunDir":
        """``self``, or RunDirError when the directory does not exist."""
        if not self.root.is_dir():
            raise RunDirError(f"run directory {self.root} does not exist")
        return self

    def read_config(self) -> dict[str, Any]:
        """The resolved training config (``config.json``); RunDirError when it is missing or unreadable."""
        value = read_json(self.config)
        if value is None:
            raise RunDirError(f"{self.root} has no config.json: cannot tell how its model was trained")
        return value

    def read_manifest(self) -> dict[str, Any] | None:
        """The attack manifest, or None when there is none yet."""
        return read_json(self.manifest, fix="rerun the attack with --force to start over")

    def read_train_done(self) -> dict[str, Any] | None:
        """The summary written when training finished, or None."""
        return read_json(self.train_done)


def read_json(path: Path, fix: str = "") -> dict[str, Any] | None:
    """A JSON object from ``path``; None when the file does not exist; RunDirError when it is unreadable."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot read {path}: {err}" + (f"; {fix}" if fix else "")) from None
    if not isinstance(value, dict):
        raise RunDirError(f"{path} does not hold a JSON object" + (f"; {fix}" if fix else ""))
    return value
