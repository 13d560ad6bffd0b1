"""``dsn-robust train``: train dsn, dual or resnet into a run directory (staged schedule, checkpoints, resume).

Values come from, in increasing priority: the run's stored ``config.json`` (with ``--resume`` only), the
``--config`` TOML file (``[data]``, ``[model]``, ``[train]`` tables), then the flags. Every ablation is one flag
(``--depth-n``, ``--width``, ``--gate-fn``, ``--no-feedback``, ``--no-film``). Under ``torchrun`` the run is
data-parallel.
"""
from __future__ import annotations

import argparse
import logging
from typing import Any

from models.gates import list_gate_functions
from models.registry import list_models
from models.training import TrainConfig, TrainResult, train
from robustness.core.config import load_config_file
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.rundir import RunDir
from robustness.core.runtime import DEVICE_CHOICES, env_world
from robustness.data import list_datasets

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train",
                       description="Train a model into RUN_DIR: config.json, metrics.csv, checkpoints/{last,best}.pt, "
                                   "train.done. Flags override the --config file.")
    p.add_argument("--model", help=f"model name: {', '.join(list_models())} (default: from the config, else dsn)")
    p.add_argument("--dataset", help=f"dataset name: {', '.join(list_datasets())} (default: from the config, "
                                     f"else {TrainConfig.dataset})")
    p.add_argument("--data-root", metavar="DIR", help="folder holding the dataset's local files")
    p.add_argument("--config", metavar="TOML", help="config file with [data], [model], [train] tables")
    p.add_argument("--out", metavar="RUN_DIR", required=True, help="run directory to write")
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", choices=DEVICE_CHOICES, help="auto picks CUDA when present")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float, help="peak learning rate (SGD)")
    g = p.add_argument_group("model knobs (ablations)")
    g.add_argument("--depth-n", type=int, help="blocks per stage (ResNet-6n+2)")
    g.add_argument("--width", type=int, help="channels of the first stage")
    g.add_argument("--gate-fn", choices=list_gate_functions(), help="gate training relaxation (dsn)")
    g.add_argument("--no-feedback", action="store_true", help="no coarse-to-fine feedback (dsn, dual)")
    g.add_argument("--no-film", action="store_true", help="no FiLM path encoding (dsn)")
    r = p.add_mutually_exclusive_group()
    r.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from checkpoints/last.pt")
    r.add_argument("--force", action="store_true", help="discard what RUN_DIR holds and train from scratch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """The TrainConfig that the flags, the config file and (with --resume) the stored config describe."""
    base = TrainConfig()
    run = RunDir.at(args.out)
    if getattr(args, "resume", False) and run.config.is_file():
        try:
            stored = run.read_config()
        except RunDirError as err:
            raise ConfigError(f"unreadable stored config: {err}; use --force to start over") from None
        base = TrainConfig.from_dict(stored, where=str(run.config))
    tables = load_config_file(args.config)
    config = TrainConfig.from_tables(tables, base=base, where=f"config file {args.config}") if tables else base
    return apply_flags(config, args)


def apply_flags(config: TrainConfig, args: argparse.Namespace) -> TrainConfig:
    """``config`` with the command-line flags that were given."""
    values = config.to_dict()
    if args.dataset is not None and args.dataset != values["dataset"]:
        values["data_options"] = {}
    for flag, key in (("model", "model"), ("dataset", "dataset"), ("data_root", "data_root"), ("epochs", "epochs"),
                      ("seed", "seed"), ("device", "device"), ("batch_size", "batch_size"), ("lr", "lr")):
        value = getattr(args, flag, None)
        if value is not None:
            values[key] = value
    opts = dict(values["model_options"])
    for flag, key in (("depth_n", "depth_n"), ("width", "width"), ("gate_fn", "gate_fn")):
        value = getattr(args, flag, None)
        if value is not None:
            opts[key] = value
    if getattr(args, "no_feedback", False):
        opts["feedback"] = False
    if getattr(args, "no_film", False):
        opts["film"] = False
    # Options a model has no use for (gate_fn for resnet) are kept in the config: the trainer leaves them out for
    # that model, and a run trained by `dsn-robust run` from the same file records the same options.
    values["model_options"] = opts
    return TrainConfig.from_dict(values, where="flags")


def summary_lines(result: TrainResult) -> list[str]:
    """A short human summary of a finished run."""
    def pct(row: dict[str, Any], key: str) -> str:
        value = row.get(key)
        return "n/a" if value is None or value != value else f"{100 * value:.1f}%"

    lines = []
    if result.nothing_to_do:
        lines.append(f"{result.run_dir}: training had already finished; nothing to do")
    for label, row in (("best", result.best), ("last", result.last)):
        if not row:
            continue
        line = (f"{label} (epoch {row['epoch']}): test fine {pct(row, 'test_acc_fine')}, "
                f"coarse {pct(row, 'test_acc_coarse')}")
        if row.get("skip_coarse", 0) or row.get("skip_fine", 0) or result.config.model == "dsn":
            line += (f"; skipped blocks coarse {pct(row, 'skip_coarse')}, fine {pct(row, 'skip_fine')}; "
                     f"MACs saved {pct(row, 'macs_saved')} (of gated blocks {pct(row, 'gated_macs_saved')})")
        lines.append(line)
    if not result.nothing_to_do:
        lines.append(f"{result.config.model} on {result.config.dataset}: {result.epochs} epochs in "
                     f"{result.seconds:.1f}s" + (f" (resumed after epoch {result.resumed_from})"
                                                  if result.resumed_from else "") + f"; run dir {result.run_dir}")
    return lines


def run(args: argparse.Namespace) -> int:
    config = resolve_config(args)
    result = train(config, args.out, resume=args.resume, force=args.force, progress=not args.no_progress)
    if env_world()[1] == 0:  # rank 0 alone prints under torchrun
        for line in summary_lines(result):
            print(line)
    return 0
