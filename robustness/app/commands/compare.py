"""``dsn-robust compare RUN_A RUN_B ... --out DIR [--strict]``: skip vs no-skip on the same samples."""
from __future__ import annotations

import argparse
import sys

from robustness.core.errors import ConfigError

#: Exit status of ``--strict`` when some pair is confounded by clean accuracy or not comparable.
NOT_AN_ANSWER_EXIT = 2


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("compare", description="Pair the skipping variant with each static one on their shared samples and "
                                   "judge each pair by one rule: 'more / less robust' only when the paired test "
                                   "(Wilcoxon on per-sample log minimal-distance ratios; exact McNemar at a fixed "
                                   "eps) is significant at 0.05 and the effect's interval lies outside the "
                                   "negligible band (ratio 0.95-1.05, or +-2 points); inside the band: 'no "
                                   "practical difference'; otherwise 'no evidence' or 'inconclusive' with the "
                                   "reason. Pairs with a model near chance or 10+ points below its twin are "
                                   "'confounded'; pairs with fewer than 10 samples correct on both, a model at "
                                   "chance level on clean data (not significantly above 1 / classes by a one-sided "
                                   "binomial test at 0.05), or different attacked images (subset hash, sample "
                                   "count) or data (data options, dataset) are 'not comparable', and say why. "
                                   "Runs of one training seed each: the intervals cover test samples only "
                                   "(`dsn-robust run --seeds` pools seeds).")
    p.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="two or more attacked run directories")
    p.add_argument("--out", metavar="DIR", required=True, help="where to write the comparison")
    p.add_argument("--labels", help="comma-separated display names, one per run")
    p.add_argument("--bootstrap", type=int, default=1000, help="paired-bootstrap resamples (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    p.add_argument("--strict", action="store_true",
                   help=f"exit {NOT_AN_ANSWER_EXIT} when a pair is confounded by clean accuracy (a model near "
                        "chance or far below its twin) or not comparable (too few samples correct on both, a "
                        "model at chance level, different images or data); the comparison is still written")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from reports.compare_page import write_comparison  # torch, pandas, matplotlib: not for `compare --help`
    from robustness.findings.compare import compare_runs
    from robustness.results import load_run

    labels = args.labels.split(",") if args.labels else None
    if labels is not None and len(labels) != len(args.run_dirs):
        raise ConfigError(f"--labels names {len(labels)} runs but {len(args.run_dirs)} were given")
    comparison = compare_runs([load_run(d) for d in args.run_dirs], labels, n_boot=args.bootstrap, seed=args.seed)
    out = write_comparison(comparison, args.out)
    print(f"comparison: {out / 'index.html'} (every pair's test, band and curves; also compare.json)")
    if comparison.verdict:
        print(comparison.answer)
    if not comparison.comparable:
        problems = "; ".join([*comparison.not_comparable, *comparison.confounded])
        if args.strict:
            print(f"dsn-robust compare: not an answer (--strict): {problems}", file=sys.stderr)
            return NOT_AN_ANSWER_EXIT
        print(f"dsn-robust compare: warning: not an answer: {problems}", file=sys.stderr)
    return 0
