"""Stopping on SIGTERM the way Ctrl-C does.

SIGTERM (:func:`graceful_termination`): ``kill PID``, a batch system's time limit or a container stop ends a job
the way Ctrl-C does. The handler raises :class:`robustness.core.errors.Interrupted` (a KeyboardInterrupt) in the
main thread, so every ``finally`` and ``with`` runs: ``atomic_write`` drops the file it was writing, the writer
lock is released, the CLI prints the resume hint and exits 128 + 15 = 143. Before raising, the handler sends the
signal on to this process's ``multiprocessing`` children (the attack runner's worker ranks, the pipeline's pool
workers), which stop the same way (:func:`robustness.core.runtime.join_as_rank` installs the handler there; a
training worker gets it from the trainer); the writer lock's holder waits for them before it lets go of the lock. A second SIGTERM while
the first unwinds is ignored (it must not interrupt the clean-up; SIGKILL still ends everything, and the kernel
drops the lock); a worker asked twice re-delivers the signal to itself once its clean-up is done, so a parent that
calls ``terminate()`` on it and joins it (a broken process pool) is not left waiting. A process that was asked to stop
starts no new job (:func:`raise_if_terminating`).
"""
from __future__ import annotations

import multiprocessing
import os
import signal
import threading
from contextlib import contextmanager, suppress
from typing import Any, Iterator

from robustness.core.errors import Interrupted


#: the signals that stop a job the way Ctrl-C does (SIGINT is a KeyboardInterrupt already)
TERMINATION_SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None),) if s is not None)
#: the first termination signal this process received, and how many more came while it unwound
_termination: dict[str, int | None] = {"signum": None, "repeats": 0}


def termination_requested() -> int | None:
    """The termination signal this process received (None: none)."""
    return _termination["signum"]


def raise_if_terminating() -> None:
    """Raise :class:`Interrupted` when this process was asked to stop: it starts no new job (a pool worker that got
    SIGTERM during one training fails the next ones at once instead of running them)."""
    signum = _termination["signum"]
    if signum is not None:
        raise Interrupted(signum, _signal_name(signum))


def _signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def _on_termination(signum: int, frame: Any) -> None:
    if _termination["signum"] is not None:
        _termination["repeats"] = (_termination["repeats"] or 0) + 1
        return  # the first one is unwinding: a second must not interrupt its clean-up
    _termination["signum"] = signum
    for child in multiprocessing.active_children():  # the job's workers stop too
        with suppress(OSError, ValueError, TypeError):
            os.kill(child.pid, signum)
    raise Interrupted(signum, _signal_name(signum))


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def stop_on_termination() -> None:
    """From now on, SIGTERM raises :class:`Interrupted` in this process (a spawned worker); nothing off the main
    thread, where Python cannot set handlers."""
    if _main_thread():
        for signum in TERMINATION_SIGNALS:
            signal.signal(signum, _on_termination)


@contextmanager
def graceful_termination(reset: bool = False) -> Iterator[None]:
    """For the duration, SIGTERM raises :class:`Interrupted` in the main thread (the module docstring); the previous
    handlers afterwards. Nested uses are one. Without ``reset`` a handler someone else installed is left alone and
    a process that was already asked to stop raises at once; ``reset`` (the CLI's main, the top of a command)
    installs the handler whatever was there and forgets any request at its start and at its end."""
    if not _main_thread():
        yield
        return
    if reset:
        _termination.update(signum=None, repeats=0)
    installed: dict[int, Any] = {}
    for signum in TERMINATION_SIGNALS:
        current = signal.getsignal(signum)
        if current is _on_termination or (not reset and current not in (signal.SIG_DFL, None)):
            continue
        installed[signum] = current
        signal.signal(signum, _on_termination)
    try:
        raise_if_terminating()
        yield
    finally:
        for signum, previous in installed.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        if reset:  # the command is over: an in-process caller (a test, the API) starts afresh
            _termination.update(signum=None, repeats=0)
        elif installed and _termination["repeats"] and _termination["signum"] is not None:
            # asked again while unwinding (a pool's terminate() after the forwarded signal): the clean-up is done,
            # so the signal now does what it would have done without this handler (a parent joining this worker
            # must not wait for it forever)
            os.kill(os.getpid(), _termination["signum"])
