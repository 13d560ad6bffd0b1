"""Files written without ever being half-written, and OS errors as one line naming the path.

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
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from robustness.core.errors import RunDirError, first_line

try:
    import resource
except ImportError:  # Windows: no file-size limit to report
    resource = None  # type: ignore[assignment]

#: OS errors that mean "this place cannot be written" (and not a bug): turned into one RunDirError line
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EEXIST,
               errno.EFBIG, errno.ENAMETOOLONG, errno.EIO}
#: what the suite may add below a directory it is given to write (records/<evaluation id>/shard-NNNNN.parquet and
#: atomic_write's temporary names): check_path's room for output folders
OUTPUT_ROOM = 256
#: a message shows a path up to this many characters; a longer one keeps its start and its end
_SHOWN_PATH = 160


def is_temporary(name: str) -> bool:
    """Whether ``name`` is one of :func:`atomic_write`'s temporary files (``.<target>.<random>.tmp``)."""
    return name.startswith(".") and name.endswith(".tmp")


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
