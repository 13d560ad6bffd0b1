"""``dsn-robust``: train, attack, report, compare, bench, run, check-model.

Each subcommand lives in ``robustness/app/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``handler`` to a function ``(args) -> int``. A user's mistake (any ``DSNError``) becomes one line
on stderr and a non-zero exit; so does an OSError the environment caused wherever it was raised (a full disk, the
file-size limit, a name too long, a read-only place: :func:`robustness.core.files.os_error_line`), and every path
argument is checked for names and lengths the file system refuses before the command starts. Ctrl-C (exit 130) and
SIGTERM (exit 143: :func:`robustness.core.signals.graceful_termination` turns it into the same interruption) say
how to resume; the work unwinds as it does for Ctrl-C, so the writer lock is released and no file is left
half-written. An exception raised in the user's own code (a ``--model-file`` or a module beside it: its import,
its factory, its forward during an attack) is the user's to fix: one line ``your model raised TYPE: MESSAGE at
FILE:LINE`` (the innermost frame of theirs, :func:`models.model_file.user_code_frame`), exit 2. Anything else is a
bug: one line naming the exception type and a file holding the traceback (``$XDG_CACHE_HOME/dsn-robust/``, else
``~/.cache/dsn-robust/``, else the system temp folder), exit 1. Both save the traceback, and ``-v`` prints it.

A usage mistake argparse finds is one line too (its usage text is left to ``--help``). ``-v`` / ``-q`` work before
or after the subcommand: argparse gives a subparser's defaults precedence over the main parser's values, so the
subcommands' copies default to ``SUPPRESS`` (absent unless given).

Start-up: ``--version`` and ``--help`` answer in a fraction of a second. The command modules import torch, pandas
and matplotlib, so :func:`main` imports only the invoked command's module (the first word of the command line
that is not an option; the main parser's options take no value) and builds its parser in full; every other
command is a bare entry that ``--help`` lists with its line of :data:`COMMAND_HELP`, the one place that line is
written (a command's ``register`` passes none; one it passes is overridden). :func:`build_parser` with no argument
builds every command. Nothing on the way to a command imports torch before that command does
(``robustness.core.runtime`` does; the CLI never imports it).
"""
from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import tempfile
import time
import traceback
import typing
from collections.abc import Iterable
from pathlib import Path

from robustness.core.errors import DSNError, Interrupted, first_line
from robustness.core.files import OUTPUT_ROOM, check_path, os_error_line
from robustness.core.versions import package_version, package_versions

#: each command's line in ``dsn-robust --help``, keyed by its module under ``robustness.app.commands`` (the command's
#: name with ``-`` for ``_``), in the order the help lists them; the main parser sets it as the command's ``help``
COMMAND_HELP = {
    "train": "train a model (`dsn-robust models` lists them) into a run directory",
    "attack": "attack a trained run (fixed-eps, minimal-distance, gradient-free and gate-aware attacks)",
    "report": "write RUN_DIR/report/ (index.html, report.md, summary.csv, summary.json)",
    "compare": "compare runs (dsn, dsn open mode, dual, resnet) on the same samples",
    "bench": "measure the wall-clock saving of real layer skipping (prints JSON + table); `bench reference RUN_DIR` "
             "runs the independent reference PGD",
    "run": "the main job end to end: train, attack, report, compare",
    "models": "list the registered models and their options",
    "datasets": "list the datasets (digits and synthetic are built in; the others read local files)",
    "check_model": "check that an adapted model (--model-file) reproduces its own forward, and whether it is random "
                   "at test time",
}
#: the command modules, each with ``register(subparsers)``
COMMANDS = tuple(COMMAND_HELP)
#: path arguments of the commands (their ``dest``) -> (how a message names them, whether the suite writes below them)
PATH_ARGUMENTS = {"out": ("--out", True), "run_dir": ("RUN_DIR", True), "run_dirs": ("RUN_DIR", True),
                  "run": ("--run", False), "config": ("--config", False), "data_root": ("--data-root", False),
                  "transfer_from": ("--transfer-from", False), "weights": ("--weights", False),
                  "model_file": ("--model-file", False)}
log = logging.getLogger("dsn_robust")


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage mistake as one line like every other error (the full usage is one ``--help`` away).
    Subparsers are built with the main parser's class, so every command gets this."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Commands(argparse._SubParsersAction):
    """The main parser's subparsers: a command's one-line help is its :data:`COMMAND_HELP` entry, whatever its
    ``register`` passes, so that the line is the same whether the command was built or only listed."""

    def add_parser(self, name: str, **kwargs: typing.Any) -> argparse.ArgumentParser:
        if _module_name(name) in COMMAND_HELP:
            kwargs["help"] = COMMAND_HELP[_module_name(name)]
        return super().add_parser(name, **kwargs)


def build_parser(commands: Iterable[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``dsn-robust``, with every command's parser built in full, or only those of ``commands``
    (module names as in :data:`COMMANDS`): each other command is then a bare entry, listed by ``--help`` and
    accepted by argparse, that imports nothing (:func:`main` builds only the invoked command)."""
    full = COMMANDS if commands is None else tuple(commands)
    parser = _Parser(
        prog="dsn-robust",
        description="Train dynamic layer-skipping networks (DSN) and static twins, attack them, and report whether "
                    "layer skipping buys robustness.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    _add_verbosity(parser, default=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_Commands)
    for name in COMMANDS:
        if name in full:
            importlib.import_module(f"robustness.app.commands.{name}").register(sub)
        else:
            sub.add_parser(name.replace("_", "-"))
    for command in _subcommand_parsers(parser):
        _add_verbosity(command, default=argparse.SUPPRESS)
    return parser


def invoked_command(argv: list[str]) -> str | None:
    """The module (as in :data:`COMMANDS`) of the command ``argv`` invokes: its first word that is not an option,
    as the main parser's options take no value; None when that word is no command (argparse then says so)."""
    word = next((arg for arg in argv if not arg.startswith("-")), None)
    return _module_name(word) if word is not None and _module_name(word) in COMMANDS else None


def _module_name(command: str) -> str:
    return command.replace("-", "_")


def _add_verbosity(parser: argparse.ArgumentParser, default: object) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", default=default,
                        help="debug logging; an unexpected error prints its traceback")
    parser.add_argument("-q", "--quiet", action="store_true", default=default, help="warnings and errors only")


def _subcommand_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """Every parser below ``parser`` (the commands, and their modes such as ``bench reference``)."""
    found = []
    for action in parser._actions:  # argparse keeps subparsers only here
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases map to the same parser
                found += [child, *_subcommand_parsers(child)]
    return found


def _command_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The innermost parser that ``args`` went through (``bench reference``'s for ``bench reference ...``)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and getattr(args, action.dest, None) in action.choices:
            return _command_parser(action.choices[getattr(args, action.dest)], args)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = invoked_command(argv)
    parser = build_parser([command] if command else [])  # only the invoked command imports its modules
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:  # said by the command's own parser: "dsn-robust train: error: ...", as its other mistakes
            _command_parser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as stop:  # --help, --version, or a usage error already printed as one line
        return stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 2
    prog = _command_parser(parser, args).prog  # "dsn-robust bench reference" for the mode of a command
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        from robustness.core.signals import graceful_termination

        with graceful_termination(reset=True):  # SIGTERM: the same unwinding as Ctrl-C
            check_paths(args)
            return int(args.handler(args) or 0)
    except DSNError as err:
        print(f"{prog}: error: {_one_line(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt as err:
        how = f" by {err.signal_name}" if isinstance(err, Interrupted) else ""
        print(f"{prog}: interrupted{how}; finished work is saved, rerun with --resume to continue",
              file=sys.stderr)
        return err.exit_code if isinstance(err, Interrupted) else 130
    except OSError as err:
        line = os_error_line(err)
        if line is None:
            return _unexpected(err, args, argv, prog)
        print(f"{prog}: error: {_one_line(line)}", file=sys.stderr)
        return 2
    except Exception as err:
        return _unexpected(err, args, argv, prog)


def check_paths(args: argparse.Namespace) -> None:
    """RunDirError (one line) for a path argument with a name or length the file system refuses (see
    :data:`PATH_ARGUMENTS`), before the command does any work."""
    for dest, (what, written) in PATH_ARGUMENTS.items():
        value = getattr(args, dest, None)
        for path in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(path, (str, os.PathLike)) and str(path):
                check_path(path, what, room=OUTPUT_ROOM if written else 0)


def _unexpected(err: Exception, args: argparse.Namespace, argv: list[str] | None, prog: str) -> int:
    """An exception no layer turned into a DSNError, as one line with its traceback saved (the module docstring):
    the user's model's when a frame of their code raised it (exit 2), else the suite's bug (exit 1)."""
    if args.verbose:  # never a raw traceback for the user unless asked, but keep it for the report
        traceback.print_exception(type(err), err, err.__traceback__)
    saved = save_traceback(err, sys.argv[:1] + list(argv if argv is not None else sys.argv[1:]))
    kept = f"the traceback is in {saved}" if saved else "the traceback could not be saved"
    where = _user_code_frame(err)
    if where:  # the frames below theirs (torch's, the suite's) are in the saved traceback
        print(f"{prog}: error: your model raised {type(err).__name__}: {_one_line(first_line(err), 160)} at "
              f"{where[0]}:{where[1]} ({kept}; -v prints it)", file=sys.stderr)
        return 2
    print(f"{prog}: error: unexpected {type(err).__name__}: {_one_line(str(err), 160)} "
          f"(a bug; {kept}; -v prints it)", file=sys.stderr)
    return 1


def _user_code_frame(err: Exception) -> tuple[str, int] | None:
    """Where ``err`` was raised in a loaded model file's code, or None. Only asked when a model file can have been
    loaded (``models.model_file`` imported), so a failure elsewhere never pays for importing torch here."""
    if "models.model_file" not in sys.modules:
        return None
    from models.model_file import user_code_frame

    return user_code_frame(err)


def _one_line(text: str, limit: int = 0) -> str:
    """``text`` as one line (a multi-line message joined with ``; ``), cut to ``limit`` characters when given."""
    line = "; ".join(part.strip() for part in text.strip().splitlines() if part.strip())
    return line if not limit or len(line) <= limit else line[:limit - 3] + "..."


def crash_dir() -> Path:
    """Where tracebacks of unexpected errors are saved: ``$XDG_CACHE_HOME/dsn-robust`` or ``~/.cache/dsn-robust``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsn-robust"


def save_traceback(err: BaseException, argv: list[str]) -> Path | None:
    """Write ``err``'s traceback, the command line and the package versions to a new file in :func:`crash_dir`
    (or the system temp folder when that cannot be written); its path, or None when neither can be written."""

    text = "".join([f"command: {' '.join(argv)}\n", f"versions: {package_versions()}\n\n",
                    *traceback.format_exception(type(err), err, err.__traceback__)])
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
    for folder in (crash_dir(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(text, encoding="utf-8")
            return path
        except OSError:
            continue
    return None


if __name__ == "__main__":
    sys.exit(main())
