"""``dsn-robust datasets``: list the datasets the suite can read."""
from __future__ import annotations

import argparse

from robustness.data import list_datasets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in list_datasets():
        print(name)
    return 0
