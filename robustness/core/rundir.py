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
once, and concurrent writers are not detected there. A holder interrupted (Ctrl-C, or SIGTERM, which
:mod:`robustness.core.runtime` turns into the same KeyboardInterrupt) first waits for its ``multiprocessing``
children, the workers of its job, to stop, then releases the lock: no worker writes a shard after the lock is gone.

A place that cannot be written is one RunDirError line naming the path and the cause, raised before anything is
left half-written: permission, a read-only file system, a full disk or quota, a file larger than the file-size
limit (``ulimit -f``: EFBIG, or torch's file writer failing on it), a name or path longer than the file system
allows (:func:`check_path` refuses those before any work).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import multiprocessing
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from robustness.core.errors import RunDirError, first_line

try:
    import fcntl
except ImportError:  # Windows: no flock (see the module docstring)
    fcntl = None  # type: ignore[assignment]
try:
    import resource
except ImportError:  # Windows: no file-size limit to report
    resource = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: environment variable listing (os.pathsep-separated) the lock files an ancestor process holds for its job
LOCKS_ENV = "DSN_ROBUST_LOCKS"
#: OS errors that mean "this place cannot be written" (and not a bug): turned into one RunDirError line
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
               errno.EFBIG, errno.ENAMETOOLONG, errno.EIO}
#: how long an interrupted lock holder waits for its worker processes to stop before it releases the lock anyway
CHILDREN_GRACE_S = 60.0
#: what the suite may add below a directory it is given to write (records/<evaluation id>/shard-NNNNN.parquet and
#: atomic_write's temporary names): check_path's room for output folders
OUTPUT_ROOM = 256
#: a message shows a path up to this many characters; a longer one keeps its start and its end
_SHOWN_PATH = 160
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
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the job's workers stop before the lock goes
        _wait_for_children()
        raise
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


def _wait_for_children(timeout: float = CHILDREN_GRACE_S) -> None:
    """Wait (at most ``timeout`` seconds in all) for this process's ``multiprocessing`` children to exit: an
    interrupted holder's workers, which got the signal too (the terminal's process group for Ctrl-C; the handler of
    :func:`robustness.core.runtime.graceful_termination` forwards SIGTERM)."""
    deadline = time.monotonic() + timeout
    for child in multiprocessing.active_children():
        child.join(max(0.0, deadline - time.monotonic()))
    if multiprocessing.active_children():
        log.warning("worker process(es) %s still running; releasing the lock anyway",
                    ", ".join(str(c.pid) for c in multiprocessing.active_children()))


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
            if err.errno == errno.ENAMETOOLONG:  # nothing can be asked about such a path
                raise _unwritable(path.parent, err) from None
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
        return RunDirError(f"cannot write {shown(path)}: a file stands where a directory should be")
    if err.errno in _UNWRITABLE:
        return RunDirError(f"cannot write {shown(path)}: {os_error_reason(err, path)}")
    return err


def os_error_reason(err: OSError, path: str | os.PathLike[str] | None = None) -> str:
    """Why an OS call failed, as the clause of a message: the system's words (``no space left on device``), with
    the limit that was hit where it can be told (``ulimit -f``, the length of a name or a path) and a fix."""
    # the system's words for the errno, not a library's (pyarrow's EFBIG reads "error writing bytes to file. ...")
    reason = (os.strerror(err.errno) if err.errno in _UNWRITABLE else err.strerror or type(err).__name__).lower()
    if err.errno == errno.EFBIG:
        limit = file_size_limit()
        return reason + (f" (this process may write files of at most {limit} bytes: raise ulimit -f)"
                         if limit is not None else " for this file system")
    if err.errno == errno.ENAMETOOLONG:  # the name the kernel refused (a temporary or lock file's), else ours
        for target in (err.filename, path):
            problem = _too_long(Path(os.fsdecode(target))) if target is not None else ""
            if problem:
                return problem
        return reason
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return reason + "; pick a writable place or fix its permissions"
    return reason


def os_error_line(err: OSError) -> str | None:
    """One line for an OSError that the environment caused (a full disk, the file-size limit, a name too long, a
    read-only place, an I/O error) wherever it was raised, naming the file; None for any other OSError (a bug)."""
    if err.errno not in _UNWRITABLE - {errno.EEXIST, errno.ENOTDIR}:
        return None
    where = os.fsdecode(err.filename) if err.filename is not None else None
    return f"{shown(where) + ': ' if where else ''}{os_error_reason(err, where)}"


def file_size_limit() -> int | None:
    """This process's file-size limit in bytes (``ulimit -f``, RLIMIT_FSIZE); None when there is none."""
    if resource is None:
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY or soft < 0 else int(soft)


def shown(path: str | os.PathLike[str]) -> str:
    """``path`` for a message: as given, or its start and end around an ellipsis with its length when it is long."""
    text = os.fsdecode(path)
    if len(text) <= _SHOWN_PATH:
        return text
    keep = (_SHOWN_PATH - 30) // 2
    return f"{text[:keep]}...{text[-keep:]} ({len(text)} characters)"


def _limits(path: Path) -> tuple[int, int]:
    """(longest name, longest path) in bytes that the file system holding ``path`` (or its nearest existing
    ancestor) accepts; Linux's 255 and 4095 where it cannot be asked."""
    probe = path
    while not _exists(probe) and probe != probe.parent:
        probe = probe.parent
    name_max, path_max = 255, 4096
    with contextlib.suppress(AttributeError, OSError, ValueError):
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    with contextlib.suppress(AttributeError, OSError, ValueError):
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    return name_max, path_max - 1  # PATH_MAX counts the terminating NUL


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
        return True
    except (OSError, ValueError):
        return False


def _too_long(path: Path, room: int = 0) -> str:
    """What is too long about ``path`` (a name, or the whole path with ``room`` bytes more) as ``file name too long
    (...)`` or ``path too long (...)``; "" when nothing is."""
    full = Path(os.path.abspath(path))
    name_max, path_max = _limits(full)
    for part in full.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            return f"file name too long (a name of {size} bytes; this file system allows at most {name_max})"
    size = len(os.fsencode(str(full)))
    if size + room > path_max:
        more = f", and the suite writes paths up to {room} bytes longer inside it" if room else ""
        return f"path too long ({size} bytes{more}; this system allows at most {path_max})"
    return ""


def check_path(path: str | os.PathLike[str], what: str, room: int = 0) -> None:
    """RunDirError (one line naming ``what``, e.g. ``--out``) when ``path`` has a name longer than its file system
    allows or is, with ``room`` bytes more (:data:`OUTPUT_ROOM` for a folder the suite writes into), longer than the
    system's path limit: refused before any work, not after an epoch of training when the first file is saved."""
    problem = _too_long(Path(os.fsdecode(path)), room)
    if problem:
        raise RunDirError(f"{what} {shown(path)}: {problem}; pick a shorter one")


def file_sha256(path: str | os.PathLike[str]) -> str:
    """The SHA-256 hex digest of a file's bytes (what ties attack records to the checkpoint they were made on)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it onto ``path``.

    A crash, Ctrl-C or SIGTERM in the middle leaves the previous ``path`` (or nothing) in place, never a partial file:
    the rename happens only after ``write`` returned. A place that cannot be written (permission, read-only file
    system, disk full or quota, the file-size limit, a name too long, a file where a folder should be) is one
    RunDirError line naming ``path``; so is torch's file writer failing (``torch.save`` reports a short write as a
    RuntimeError without the OS error: the cause is told from the file-size limit and the free space).
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_temporary_stem(path.name)}.", suffix=".tmp", dir=path.parent)
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
    except RuntimeError as err:
        if not _file_writer_failed(err):
            Path(tmp).unlink(missing_ok=True)
            raise
        failure = RunDirError(f"cannot write {shown(path)}: {_write_failure_cause(Path(tmp), err)}")
        Path(tmp).unlink(missing_ok=True)
        raise failure from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temporary_stem(name: str) -> str:
    """``name`` shortened so that its temporary file's name (``.<stem>.<8 random>.tmp``) is no longer than a name
    the file system accepts wherever ``name`` itself is."""
    encoded = os.fsencode(name)
    return name if len(encoded) <= 200 else os.fsdecode(encoded[:200])


#: what torch's file writer (caffe2's PyTorchStreamWriter) says when a write to its file fails
_FILE_WRITER_ERRORS = ("PytorchStreamWriter failed", "inline_container.cc")


def _file_writer_failed(err: RuntimeError) -> bool:
    return any(mark in str(err) for mark in _FILE_WRITER_ERRORS)


def _write_failure_cause(tmp: Path, err: BaseException) -> str:
    """Why a write that reports no OS error failed (torch's file writer): the file-size limit when the partial file
    reached it, a full disk when (almost) nothing is free, else the writer's own words."""
    try:
        size = tmp.stat().st_size
    except OSError:
        size = 0
    limit = file_size_limit()
    if limit is not None and size >= limit:
        return f"file too large (this process may write files of at most {limit} bytes: raise ulimit -f)"
    try:
        st = os.statvfs(tmp.parent)
        free = (st.f_bfree if hasattr(os, "geteuid") and os.geteuid() == 0 else st.f_bavail) * st.f_frsize
    except (AttributeError, OSError):
        free = None
    if free is not None and free < 1 << 20:
        return "no space left on device"
    return f"the write failed ({first_line(err)}): the disk may be full, a quota reached or the file too large"


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
