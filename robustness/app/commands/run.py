"""``dsn-robust run``: train dsn, dual and resnet, attack them, write every report and the comparison."""
from __future__ import annotations

import argparse

from robustness.core.config import DEFAULT_CONFIG, default_config_path
from robustness.core.runtime import DEVICE_CHOICES
from robustness.data.subset import SUBSET_RULES


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run",
                       description="Train every model of the config's [run] table, attack each with its [attack] "
                                   "table (attacks, eps grid, routing gradients; `dsn-robust attack --help` lists "
                                   "what is registered), then the [run] transfer pairs, write each report and the "
                                   "comparison, and print a summary.")
    p.add_argument("--config", default=None, metavar="TOML",
                   help=f"config with [data], [model], [train], [attack], [run] tables (default {DEFAULT_CONFIG})")
    p.add_argument("--out", default="runs/quickstart", metavar="DIR", help="output directory (default runs/quickstart)")
    p.add_argument("--device", choices=DEVICE_CHOICES, help="override the config's device")
    p.add_argument("--data-root", metavar="DIR", help="override the config's data root")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--force", action="store_true", help="delete what --out holds and start over")
    p.add_argument("--set", dest="set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override one config key, e.g. attack.n=256, train.epochs=2, attack.pgd.restarts=1 or "
                        "run.models=[\"dsn\",\"resnet\"] (VALUE is read as TOML, a bare word as a string; "
                        "repeatable)")
    p.add_argument("--unset", dest="unset", action="append", default=[], metavar="TABLE.KEY",
                   help="drop one key of the config file for this run, e.g. data.image_size (before --set; "
                        "repeatable). --set data.name=OTHER drops the old dataset's options by itself")
    p.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                   help="training seeds, e.g. 0,1,2 or 0-4: every model is trained and attacked once per seed (in "
                        "OUT/seed-<s>/<model>) and the comparison pools them (overrides [run] seeds; default: the "
                        "[train] seed alone)")
    p.add_argument("--subset", choices=SUBSET_RULES,
                   help="which test images are attacked: stratified (default: a seeded, class-balanced draw, the "
                        "same for every model and seed) or first (the first n, as published 'first n' evaluations)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(handler=run)


def seed_list(text: str) -> list[int]:
    """``0,1,2`` or ``0-4`` (or a mix, ``0,3-5``) as a list of distinct non-negative seeds."""
    seeds: list[int] = []
    try:
        for part in text.split(","):
            low, sep, high = part.strip().partition("-")
            seeds += list(range(int(low), int(high) + 1)) if sep else [int(low)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds such as 0,1,2 or 0-4, got {text!r}") from None
    if not seeds or any(not 0 <= s < 2 ** 63 for s in seeds) or len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"expected distinct seeds in 0..2^63-1 such as 0,1,2 or 0-4, got {text!r}")
    return seeds


def run(args: argparse.Namespace) -> int:
    from robustness.app.pipeline import PipelineConfig, format_summary, run_pipeline  # pandas: not for `run --help`

    config = PipelineConfig.from_file(args.config or default_config_path(), device=args.device,
                                      data_root=args.data_root, overrides=args.set, seeds=args.seeds,
                                      subset=args.subset, unset=args.unset)
    config.check_machine()  # no CUDA, a missing data root: one line before --out is created
    result = run_pipeline(config, args.out, resume=args.resume, force=args.force, progress=not args.no_progress)
    print(format_summary(result))
    return 0
