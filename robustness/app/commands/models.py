"""``dsn-robust models``: list the registered models, each with its own options, and the gate functions."""
from __future__ import annotations

import argparse

from models.gates import list_gate_functions
from models.registry import list_models, model_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("models")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style filter, e.g. 'd*'")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in list_models(args.pattern):
        print(f"{name}: {', '.join(model_options(name))}")
    print(f"gate functions (option gate_fn): {', '.join(list_gate_functions())}")
    return 0
