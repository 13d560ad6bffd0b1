"""``dsn-robust models``: list registered models and their options."""
from __future__ import annotations

import argparse

from models.registry import list_models, model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models", help="list the registered models and their options")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'd*'")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern):
        print(f"{name}: {', '.join(model_options(name))}")
    return 0
