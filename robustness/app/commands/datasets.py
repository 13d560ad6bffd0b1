"""``dsn-robust datasets``: list the registered datasets, each with its own options (read from the registry)."""
from __future__ import annotations

import argparse

from robustness.data import list_datasets
from robustness.data.registry import dataset_needs_root, dataset_options


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("datasets", description="The registered datasets (plug-ins included), each with the options "
                                               "its [data] table and --set data.KEY=VALUE take.")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    for name in list_datasets():
        local = " (reads a local copy: --data-root)" if dataset_needs_root(name) else ""
        print(f"{name}: {', '.join(dataset_options(name)) or 'no options'}{local}")
    return 0
