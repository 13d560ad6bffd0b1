"""``dsn-robust compare RUN_A RUN_B ... --out DIR``: skip vs no-skip on the same samples."""
from __future__ import annotations

import argparse

from reports.html import write_comparison
from robustness.analysis.compare import compare_runs
from robustness.core.errors import ConfigError
from robustness.results import load_run


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", help="compare runs (dsn, dsn open mode, dual, resnet) on the same samples")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="two or more attacked run directories")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write the comparison")
    p.add_argument("--labels", help="comma-separated display names, one per run")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        raise ConfigError(f"--labels names {len(labels)} runs but {len(args.run_dirs)} were given")
    comparison = compare_runs([load_run(d) for d in args.run_dirs], labels, n_boot=args.bootstrap, seed=args.seed)
    out = write_comparison(comparison, args.out)
    print(f"comparison: {out / 'index.html'}")
    if comparison.verdict:
        print(comparison.verdict)
    return 0
