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
(``robustness.core``) and imports nothing else of the project but the typed errors.

One writer per run: ``with run.writing("attack"):`` holds an exclusive ``fcntl.flock`` on ``RUN_DIR/.lock`` (train,
attack, report and run take it), so a second writer gets one RunDirError line naming the holder's PID and command
and touches nothing. The kernel drops a flock when its holder dies, even by ``kill -9``, so a stale ``.lock`` file
is simply taken over: no PID guessing, no timeouts. Processes that work on one run together (the runner's worker
ranks, ``torchrun`` ranks, the pipeline's training and attack workers) must not lock against their own job: the
process that owns the job (the parent, or rank 0 of a ``torchrun`` launch) holds the lock; a process whose
``RANK`` is not 0 never takes it, and a process started by the holder (``multiprocessing`` spawn inherits the
environment) finds the path in ``DSN_ROBUST_LOCKS`` and proceeds under its parent's lock. Pitfalls: a flock
belongs to an open file description, so the file is unlinked while still locked on release and a new holder
checks that the file it locked is still the one at the path (else a late opener of the old inode and a creator of
a new one could both "hold" it); flock is advisory and unreliable on some network file systems (NFS before Linux
2.6.12 emulates it with POSIX locks). Where ``fcntl`` does not exist (Windows) no lock is taken: a warning says so
once, and concurrent writers are not detected there.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from robustness.core.errors import RunDirError

try:
    import fcntl
except ImportError:  # Windows: no flock (see the module docstring)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: environment variable listing (os.pathsep-separated) the lock files an ancestor process holds for its job
LOCKS_ENV = "DSN_ROBUST_LOCKS"
#: OS errors that mean "this place cannot be written" (and not a bug): turned into one RunDirError line
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST}
_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth
#: what the suite writes at the top of a run directory (the layout above), besides atomic_write's temporary files
RUN_ENTRIES = frozenset({"config.json", "checkpoints", "metrics.csv", "train.done", "attacks", "report", ".lock"})


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files (``.<target>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


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


@contextlib.contextmanager
def writer_lock(path: Path, command: str) -> Iterator[None]:
    """Hold the exclusive lock file ``path`` (``RunDir.writing``; the pipeline locks its output folder with it)."""
    path = Path(path).absolute()
    if fcntl is None:
        _warn_no_lock()
        yield
        return
    if _covered(path):
        _held[path] = _held.get(path, 0) + 1  # nested, or this process works for the holder's job
        try:
            yield
        finally:
            _held[path] -= 1
            if not _held[path]:
                del _held[path]
        return
    created = not path.parent.exists()
    fd = _acquire(path, command)
    _held[path] = 1
    inherited = os.environ.get(LOCKS_ENV)
    os.environ[LOCKS_ENV] = os.pathsep.join(filter(None, [inherited, str(path)]))
    try:
        yield
    finally:
        del _held[path]
        if inherited is None:
            os.environ.pop(LOCKS_ENV, None)
        else:
            os.environ[LOCKS_ENV] = inherited
        path.unlink(missing_ok=True)  # unlinked while still locked: see the module docstring
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                path.parent.rmdir()  # only when the body left the new directory empty


def _covered(path: Path) -> bool:
    """Whether this process already works under ``path``'s lock: it holds it, it is a non-zero rank of a job
    whose rank 0 holds it, or its parent holds it for the job (``DSN_ROBUST_LOCKS``)."""
    if path in _held:
        return True
    if os.environ.get("RANK", "0") not in ("", "0") and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        return True
    return str(path) in os.environ.get(LOCKS_ENV, "").split(os.pathsep)


def _acquire(path: Path, command: str) -> int:
    for _ in range(100):  # retried only when the lock file was replaced between open and flock (a release)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o666)
        except OSError as err:
            if err.errno == errno.ELOOP or path.is_symlink():
                raise RunDirError(f"{path} is a symbolic link, not the suite's lock file; the suite never writes "
                                  f"through links: remove it, then rerun") from None
            if err.errno == errno.EISDIR or path.is_dir():
                raise RunDirError(f"{path} is a directory, not the suite's lock file: remove it, then "
                                  f"rerun") from None
            raise _unwritable(path.parent, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunDirError(f"{path.parent} is being written by another process ({holder}); wait for it to "
                              f"finish or stop it, then rerun") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        argv = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else ""
        info = {"pid": os.getpid(), "command": command, "argv": argv[:200],
                "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        return fd
    raise RunDirError(f"cannot take the writer lock {path}: it keeps being replaced by other processes")


def _holder(fd: int) -> str:
    """What the lock file says about its holder, as the clause of an error message."""
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        info = {}
    if not isinstance(info, dict) or "pid" not in info:
        return "pid unknown"
    what = f"`{info['argv']}`" if info.get("argv") else str(info.get("command", "?"))
    return f"pid {info['pid']}, {info.get('command', '?')}: {what}, since {info.get('started', '?')}"


_warned: list[bool] = []


def _warn_no_lock() -> None:
    if not _warned:
        log.warning("no writer lock on this platform (no fcntl): do not run two commands on one run directory")
        _warned.append(True)


def _unwritable(path: Path, err: OSError) -> Exception:
    """``err`` as one RunDirError line naming ``path`` when the place cannot be written, else ``err`` itself."""
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        return RunDirError(f"cannot write {path}: a file stands where a directory should be")
    if err.errno in _UNWRITABLE:
        reason = err.strerror or type(err).__name__
        return RunDirError(f"cannot write {path}: {reason.lower()}"
                           + ("; pick a writable place or fix its permissions"
                              if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else ""))
    return err


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes (what ties attack records to the checkpoint they were made on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash or Ctrl-C in the middle leaves the previous ``path`` (or nothing) in place, never a partial file. A
    place that cannot be written (permission, read-only file system, disk full, a file where a folder should be)
    is one RunDirError line naming ``path``.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise _unwritable(path, err) from None
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the permissions open() would
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise _unwritable(path, err) from None
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
