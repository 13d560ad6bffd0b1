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

:class:`RunDir` is the one owner of those paths and of reading the run's JSON files: other modules ask it for a
path or a parsed file and never build run paths or parse run files themselves. It sits on the ground floor
(``robustness.core``) and imports nothing else of the project but the typed errors.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from robustness.core.errors import RunDirError


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

    def shard(self, evaluation_id: str, batch: int) -> Path:
        """The Parquet shard of one evaluation's batch."""
        return self.records / evaluation_id / f"shard-{batch:05d}.parquet"

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


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash or Ctrl-C in the middle leaves the previous ``path`` (or nothing) in place, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
