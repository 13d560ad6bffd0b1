"""``dsn-robust datasets``: list the datasets the suite can read."""
from __future__ import annotations

import argparse

from robustness.data import list_datasets


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", help="list the datasets (digits and synthetic are built in; the others read local "
                                          "files)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in list_datasets():
        print(name)
    return 0
