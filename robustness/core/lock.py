"""The writer lock of a run directory (``RunDir.writing``) and of the pipeline's output folder.

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
:mod:`robustness.core.signals` turns into the same KeyboardInterrupt) first waits for its ``multiprocessing``
children, the workers of its job, to stop, then releases the lock: no worker writes a shard after the lock is gone.
"""
from __future__ import annotations

import contextlib
import errno
import json
import logging
import multiprocessing
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from robustness.core.errors import RunDirError
from robustness.core.files import _unwritable

try:
    import fcntl
except ImportError:  # Windows: no flock (see the module docstring)
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

#: environment variable listing (os.pathsep-separated) the lock files an ancestor process holds for its job
LOCKS_ENV = "DSN_ROBUST_LOCKS"
#: how long an interrupted lock holder waits for its worker processes to stop before it releases the lock anyway
CHILDREN_GRACE_S = 60.0
_held: dict[Path, int] = {}  # lock files this process holds -> nesting depth


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
    :func:`robustness.core.signals.graceful_termination` forwards SIGTERM)."""
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
