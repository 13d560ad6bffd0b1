"""Typed errors that a user can act on.

The ground floor of the import graph (``robustness.core``): every package may raise these,
and the CLI turns any ``DSNError`` into one line on stderr and a non-zero exit.
"""
from __future__ import annotations


class DSNError(Exception):
    """Base class: a problem the user can fix. ``str(err)`` is the one line the CLI prints."""

    exit_code = 2


class ConfigError(DSNError):
    """An invalid option, flag value or config file entry."""


class UnknownNameError(ConfigError):
    """A model, dataset, attack or other registered name that does not exist."""

    def __init__(self, kind: str, name: str, known: list[str] | tuple[str, ...]):
        self.kind, self.name, self.known = kind, name, list(known)
        super().__init__(f"unknown {kind} {name!r}; choose one of: {', '.join(sorted(self.known))}")


class DataError(DSNError):
    """A dataset root that is missing, incomplete or malformed."""


class CheckpointError(DSNError):
    """A checkpoint that is missing, corrupt, unsafe or belongs to another model or dataset."""


class RunDirError(DSNError):
    """A run directory that already holds results (and neither --resume nor --force was given), or lacks them."""


class BudgetViolation(DSNError):
    """An adversarial example outside its eps ball or outside [0, 1]: the evaluation would be invalid."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """The process was asked to stop by a signal (SIGTERM): raised by the handler of
    :func:`robustness.core.signals.graceful_termination` wherever the main thread is, so the work unwinds exactly
    as it does for Ctrl-C (a KeyboardInterrupt): the file being written is dropped (``atomic_write``), finished
    files stay, the writer lock is released. Not a DSNError: no ``except DSNError`` / ``except Exception`` swallows
    it. ``exit_code`` is the shell's convention for a death by that signal (128 + its number: 143 for SIGTERM)."""

    def __init__(self, signum: int, name: str = ""):
        self.signum = int(signum)
        self.signal_name = name or f"signal {signum}"
        self.exit_code = 128 + self.signum
        super().__init__(self.signal_name)

    def __reduce__(self):  # a worker's interruption travels back to its parent (a process pool pickles it)
        return type(self), (self.signum, self.signal_name)


def first_line(err: BaseException, default: str = "") -> str:
    """The first line of ``err``'s message (a library's multi-line error as one clause of ours); ``default``, else
    the exception's type name, when the message is empty."""
    text = str(err).strip()
    return text.splitlines()[0] if text else default or type(err).__name__
