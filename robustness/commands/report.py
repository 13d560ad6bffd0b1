"""``dsn-robust report RUN_DIR``: analysis, sanity checks and a self-contained HTML + Markdown report."""
from __future__ import annotations

import argparse

from reports.html import write_report
from robustness.core.rundir import RunDir
from robustness.results import load_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("report", help="write RUN_DIR/report/ (index.html, report.md, summary.csv, summary.json)")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory that holds attack records")
    p.add_argument("--out", metavar="DIR", help="write the report here instead of RUN_DIR/report")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir.at(args.run_dir).require()
    report = write_report(load_run(run_dir.root), args.out, n_boot=args.bootstrap, seed=args.seed)
    print(f"report: {report.index}")
    return 0
