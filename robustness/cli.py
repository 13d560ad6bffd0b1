"""``dsn-robust``: train, attack, report, compare, bench, run.

Each subcommand lives in ``robustness/commands/<name>.py`` and exposes ``register(subparsers)``, which adds its
parser and sets ``handler`` to a function ``(args) -> int``. A user's mistake (any ``DSNError``) becomes one line
on stderr and a non-zero exit; Ctrl-C says how to resume.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from robustness.core.errors import DSNError

COMMANDS = ("train", "attack", "report", "compare", "bench", "run", "models", "datasets")
log = logging.getLogger("dsn_robust")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dsn-robust",
        description="Train dynamic layer-skipping networks (DSN) and static twins, attack them, and report whether "
                    "layer skipping buys robustness.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"robustness.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    try:
        return int(args.handler(args) or 0)
    except DSNError as err:
        print(f"dsn-robust {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"dsn-robust {args.command}: interrupted; finished work is saved, rerun with --resume to continue",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
