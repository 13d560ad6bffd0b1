"""``dsn-robust bench``: throughput of real skipping vs masked execution, open network and static twins; and
``dsn-robust bench reference RUN_DIR``: an independent reference PGD that the suite's worst case is checked against.

Without a mode word ``bench`` times skipping (``dsn-robust bench [--run RUN_DIR] [--batch-size 1,256] ...``); the
modes are subparsers so that each one's flags stay its own in ``--help``.
"""
from __future__ import annotations

import argparse
import json
import tempfile
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

from attacks.runner import load_run_checkpoint
from robustness.bench.recipe import RecipeTargets, format_recipe, recipe_payload, recipe_row
from robustness.app.commands.run import seed_list
from robustness.core.config import DEFAULT_CONFIG, default_config_path
from robustness.core.lock import writer_lock
from robustness.core.rundir import RunDir
from robustness.app.pipeline import PipelineConfig, train_runs

from robustness.bench.reference import LOSSES, REFERENCE_GATE_MODES, ReferenceConfig
from robustness.bench.reference import run_reference
from robustness.bench.reference_compare import format_table as reference_table
from robustness.bench.skipping import format_table, parse_batch_sizes, run_benchmark
from robustness.core.errors import ConfigError
from robustness.core.runtime import DEVICE_CHOICES, resolve_device, torch_threads
from models.routing import GRAD_MODES
from robustness.core.vocab import HEADS, parse_eps


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench",
                       description="Without a mode: time dsn hard (sub-batch), dsn masked, dsn open, dual and resnet "
                                   "at each batch size (interleaved; min, median, spread), count their aten ops, "
                                   "CUDA kernels and host syncs, and time each gated block alone for the ideal "
                                   "saving of skipping. Targets: dsn open within 1.3x dual's time and aten ops; "
                                   "sub-batch skipping achieves >= 0.8 of the ideal saving. "
                                   "Mode `reference`: see `dsn-robust bench reference --help`.")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", metavar="RUN_DIR", help="use a trained dsn run's gates (hard mode)")
    src.add_argument("--skip", type=float, default=0.5,
                     help="without --run: force gates to skip this fraction at random per sample (default 0.5)")
    p.add_argument("--batch-size", default=None, metavar="SIZES",
                   help="comma list of batch sizes (default 1,256,2048 on CUDA; 1,256 on a CPU, where batch 2048 "
                        "takes minutes)")
    p.add_argument("--repeats", type=int, default=5,
                   help="timed rounds per variant, interleaved; ratios use the minimum (default %(default)s)")
    p.add_argument("--depth-n", type=int, default=3, help="without --run: blocks per stage (ResNet-6n+2)")
    p.add_argument("--width", type=int, default=16, help="without --run: channels of the first stage")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--device", default="auto", choices=DEVICE_CHOICES)
    p.add_argument("--no-attack-overhead", action="store_true",
                   help="skip timing the attack runner against direct torchattacks PGD")
    p.add_argument("--json-only", action="store_true", help="print only the JSON")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default 0: torch's default); use 1 on a shared CPU, where two "
                        "threads competing with other processes make timings erratic (see the spread column)")
    p.set_defaults(handler=run)
    modes = p.add_subparsers(dest="bench_mode", metavar="[MODE]", title="modes (optional; none: time skipping)")
    _register_reference(modes)
    _register_recipe(modes)


def _register_recipe(modes: argparse._SubParsersAction) -> None:
    r = modes.add_parser(
        "recipe", help="train a config's models once per seed and print each one's final test accuracy",
        description="Train every model of the config's [run] table once per seed, exactly as `dsn-robust run` "
                    "trains them, and print each (model, seed)'s last-epoch test accuracy (fine, coarse) and share "
                    "of gated MACs saved against the targets. Exit 1 when any run misses a target: a recipe is "
                    "quoted with the seeds it holds for.")
    r.add_argument("--config", default=None, metavar="TOML",
                   help=f"config with [data], [model], [train], [run] tables (default {DEFAULT_CONFIG})")
    r.add_argument("--seeds", type=seed_list, default=[0, 1, 2, 3, 4], metavar="S,S,...",
                   help="training seeds, e.g. 0-4 or 0,1,2 (default 0-4)")
    r.add_argument("--set", dest="set", action="append", default=[], metavar="TABLE.KEY=VALUE",
                   help="override one config key, as for `dsn-robust run` (repeatable)")
    r.add_argument("--out", metavar="DIR",
                   help="keep the trained runs here (OUT/seed-<s>/<model>; rerun to resume); default: a temporary "
                        "folder, deleted afterwards")
    r.add_argument("--min-fine", type=float, default=RecipeTargets.fine, metavar="ACC",
                   help="fine test accuracy every run must reach (default %(default)s)")
    r.add_argument("--min-coarse", type=float, default=RecipeTargets.coarse, metavar="ACC",
                   help="coarse test accuracy every run must reach (default %(default)s)")
    r.add_argument("--min-saved", type=float, default=RecipeTargets.gated_saved, metavar="SHARE",
                   help="share of the gated blocks' MACs a gated model must save (default %(default)s)")
    r.add_argument("--device", dest="recipe_device", default=None, choices=DEVICE_CHOICES,
                   help="override the config's device")
    r.add_argument("--json-only", action="store_true", default=argparse.SUPPRESS, help="print only the JSON")
    r.set_defaults(handler=run_recipe_command)


def _register_reference(modes: argparse._SubParsersAction) -> None:
    r = modes.add_parser(
        "reference", help="independent reference L-inf PGD on RUN_DIR, compared with its attack records",
        description="An independent plain-torch L-inf PGD (random start, alpha = 2.5 eps / steps, first fooling "
                    "iterate kept, every restart x loss x routing gradient) on the attacked samples of RUN_DIR. If "
                    "RUN_DIR has attack records, the suite's white-box worst case at each eps is compared on the "
                    "same samples, then the reference's examples join the records as attack reference-pgd (its "
                    "finds count in the worst case and the report; --no-record leaves the run as it was). Prints "
                    "JSON + a table.")
    r.add_argument("run_dir", metavar="RUN_DIR", help="a trained run directory")
    r.add_argument("--eps", default=None,
                   help="comma-separated L-inf budgets (default: the run's own fixed-eps grid from its attack "
                        "records, else 1/255,2/255,4/255,8/255)")
    r.add_argument("--n", type=int, default=None,
                   help="the first N of the run's attacked samples (default: all of them; 64 without records); "
                        "finds are recorded only when all are attacked")
    r.add_argument("--no-record", dest="record", action="store_false",
                   help="compare only: do not add the reference's examples to RUN_DIR's records")
    r.add_argument("--steps", type=int, default=50, help="PGD steps per restart (default %(default)s)")
    r.add_argument("--restarts", type=int, default=5, help="random restarts per gradient x loss (default %(default)s)")
    r.add_argument("--grads", default="none,ste,bpda,sharp",
                   help=f"routing gradients, comma-separated from {','.join(GRAD_MODES)} (default %(default)s)")
    r.add_argument("--losses", default=",".join(LOSSES), help="losses: ce, margin (default %(default)s)")
    r.add_argument("--gate-mode", default="hard", choices=REFERENCE_GATE_MODES,
                   help="forward mode attacked and deployed (default %(default)s)")
    r.add_argument("--head", default="fine", choices=HEADS, help="head under attack (default %(default)s)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--max-gap", type=float, default=None, metavar="P",
                   help="exit 1 when the suite's robust accuracy exceeds the reference's by more than P points at "
                        "some eps (needs attack records in RUN_DIR)")
    # SUPPRESS: when not given here, a value given before the mode word (`bench --device cuda reference ...`) holds
    r.add_argument("--device", default=argparse.SUPPRESS, choices=DEVICE_CHOICES, help="default: auto")
    r.add_argument("--json-only", action="store_true", default=argparse.SUPPRESS, help="print only the JSON")
    r.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (default 0: torch's default); 1 avoids the many-fold slowdown of "
                        "small batches when other processes share the cores")
    r.set_defaults(handler=run_reference_command)


def run(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    device = resolve_device(args.device)
    batch_sizes = parse_batch_sizes(args.batch_size, device)
    with torch_threads(args.threads):
        result = run_benchmark(run=args.run, skip=None if args.run else args.skip, batch_sizes=batch_sizes,
                               repeats=args.repeats, depth_n=args.depth_n, width=args.width,
                               image_size=args.image_size, device=device, attack_overhead=not args.no_attack_overhead)
    print(json.dumps(result.to_dict(), indent=2))
    if not args.json_only:
        print(format_table(result))
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def run_recipe_command(args: argparse.Namespace) -> int:
    targets = RecipeTargets(fine=args.min_fine, coarse=args.min_coarse, gated_saved=args.min_saved)
    for name, value in asdict(targets).items():
        if not 0.0 <= value <= 1.0:
            raise ConfigError(f"--min-{name.replace('gated_', '')} must be a fraction in [0, 1], got {value:g}")
    config = PipelineConfig.from_file(args.config or default_config_path(), device=args.recipe_device,
                                      overrides=args.set, seeds=args.seeds)
    config.check_machine()
    with ExitStack() as stack:
        out = Path(args.out) if args.out else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        with writer_lock(out.resolve().parent / f".{out.resolve().name}.lock", "bench recipe"):
            runs = train_runs(config, out, progress=True)
        rows = [recipe_row(name, seed, run_dir, load_run_checkpoint(RunDir.at(run_dir)).build_model().is_gated)
                for name, seed, run_dir in runs.values()]
    print(json.dumps(recipe_payload(rows, targets), indent=2))
    if not getattr(args, "json_only", False):
        print(format_recipe(rows, targets))
    return 0 if all(not r.misses(targets) for r in rows) else 1


def run_reference_command(args: argparse.Namespace) -> int:
    if args.max_gap is not None and args.max_gap < 0:
        raise ConfigError(f"--max-gap must be >= 0 points, got {args.max_gap:g}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0: torch's default), got {args.threads}")
    eps = tuple(parse_eps(e) for e in _names(args.eps)) if args.eps is not None else ()
    if args.eps is not None and not eps:
        raise ConfigError("--eps needs at least one budget, e.g. --eps 2/255,8/255 (or leave it out: the run's grid)")
    config = ReferenceConfig(eps=eps, n=args.n, steps=args.steps,
                             restarts=args.restarts, grads=_names(args.grads), losses=_names(args.losses),
                             gate_mode=args.gate_mode, head=args.head, seed=args.seed)
    with torch_threads(args.threads):
        result = run_reference(args.run_dir, config, device=resolve_device(args.device), max_gap=args.max_gap,
                               record=args.record)
    print(json.dumps(result.to_dict(), indent=2))
    if not args.json_only:
        print(reference_table(result))
    return 0 if result.passed else 1
