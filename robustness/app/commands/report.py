"""``dsn-robust report RUN_DIR``: analysis, sanity checks and a self-contained HTML + Markdown report.

The run's writer lock is held from loading the records to the last file written, wherever ``--out`` points, so a
report is never made of the shards an attack is still writing (it is refused in one line instead). Records that
are not complete (``RunResults.complete``: an interrupted attack, a missing or short shard) are reported with
their ``INCOMPLETE: ...`` line at the top of the page, a warning line on stderr, and with ``--strict`` exit 2.
"""
from __future__ import annotations

import argparse
import sys

from robustness.core.rundir import RunDir

#: Exit status of ``--strict`` when the run's records are incomplete.
INCOMPLETE_EXIT = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory that holds attack records")
    p.add_argument("--out", metavar="DIR", help="write the report here instead of RUN_DIR/report")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--strict", action="store_true",
                   help=f"exit {INCOMPLETE_EXIT} when the run's records are incomplete (an interrupted attack, a "
                        "missing or short shard); the report is still written, marked INCOMPLETE")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reports.run_page import write_report  # pandas and matplotlib: not for `report --help`
    from robustness.results import load_run

    run_dir = RunDir.at(args.run_dir).require()
    with run_dir.writing("report"):  # no report of the shards an attack is still writing, whatever --out is
        results = load_run(run_dir.root)
        report = write_report(results, args.out, n_boot=args.bootstrap, seed=args.seed)
    print(f"report: {report.index}")
    if not results.complete:
        if args.strict:
            print(f"dsn-robust report: error (--strict): {results.incomplete_line}", file=sys.stderr)
            return INCOMPLETE_EXIT
        print(f"dsn-robust report: warning: {results.incomplete_line}", file=sys.stderr)
    return 0
