"""A run directory's training so far: is it fresh, unfinished or done; the state saved to resume; resuming.

``checkpoints/last.pt`` carries everything needed to resume (optimiser, scheduler, scaler, the global torch
generator, the metrics history, the best epoch); data order and augmentation are re-seeded per epoch (see
``models.training.schedule``), so on CPU a resumed run matches an uninterrupted one bit for bit.
"""
from __future__ import annotations

import logging
from typing import Any

import torch

from models.checkpoint import load_checkpoint
from models.network import CoarseFineNet
from models.registry import create_model, model_options
from models.training.config import TrainConfig, model_kwargs
from robustness.core.errors import CheckpointError, RunDirError, first_line
from robustness.core.rundir import RunDir
from robustness.data import DatasetInfo, dataset_info

log = logging.getLogger(__name__)

#: ``best`` before any epoch competed.
NO_BEST: dict[str, Any] = {"epoch": None, "test_acc_fine": -1.0}


def run_state(run: RunDir, resume: bool, force: bool) -> str:
    """``fresh``, ``unfinished`` or ``done``; raises RunDirError where the flags do not allow going on."""
    if run.root.exists() and not run.root.is_dir():
        raise RunDirError(f"{run.root} exists and is not a directory")
    if run.train_done.exists():
        if not (resume or force):
            raise RunDirError(f"{run.root} holds a finished run; pass --resume to keep it (nothing to do) "
                              f"or --force to train again from scratch")
        return "done"
    if any(p.exists() for p in (run.config, run.metrics, run.last_checkpoint, run.best_checkpoint)):
        if not (resume or force):
            raise RunDirError(f"{run.root} holds an unfinished run; pass --resume to continue it "
                              f"or --force to start over")
        return "unfinished"
    return "fresh"


def clear_outputs(run: RunDir) -> None:
    """Remove a previous run's training outputs (``--force``)."""
    for p in (run.train_done, run.metrics, run.last_checkpoint, run.best_checkpoint, run.config):
        p.unlink(missing_ok=True)
    for stale in (run.attacks, run.report):
        if stale.exists():
            log.warning("%s belongs to the previous model; it is stale now (attack records carry the checkpoint's "
                        "SHA-256, so `attack --resume` and `report` refuse them: rerun `attack --force`)", stale)


def model_identity(module: CoarseFineNet) -> dict[str, Any]:
    """The options that identify ``module``'s architecture (what a checkpoint must match)."""
    allowed = set(model_options(module.model_name))
    return {k: v for k, v in module.config.items() if k in allowed}


def check_finished_run(run: RunDir, config: TrainConfig) -> None:
    """A finished run must be of the model and dataset asked for, or ``--resume`` would silently skip it."""
    path = run.last_checkpoint if run.last_checkpoint.exists() else run.best_checkpoint
    if not path.exists():
        return
    c = config
    ckpt = load_checkpoint(path)
    info = dataset_info(c.dataset, c.data_root, **c.data_options)
    wanted = create_model(c.model, **model_kwargs(c, info))  # its config: the options as resolved
    ckpt.check_matches(c.model, model_identity(wanted), info)


def train_state(config: TrainConfig, epoch: int, optimizer, scheduler, scaler, history: list[dict[str, Any]],
                best: dict[str, Any]) -> dict[str, Any]:
    """What ``last.pt`` stores besides the weights, after ``epoch`` epochs."""
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return {
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "rng": rng,
        # data order / augmentation generators are re-seeded each epoch from these (see epoch_batches)
        "data_generator": {"seed": config.seed, "next_epoch": epoch, "kind": "torch.Generator per epoch"},
        "history": [dict(r) for r in history],
        "best": dict(best),
        "config": config.to_dict(),
    }


def restore(run: RunDir, config: TrainConfig, module: CoarseFineNet, optimizer, scheduler, scaler,
            info: DatasetInfo) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
    """Load ``last.pt`` into the model and optimiser after checking it belongs to this config.

    Returns the epochs done, the metrics history and the best epoch so far.
    """
    path = run.last_checkpoint
    if not path.exists():
        log.info("%s: no checkpoint yet (killed during the first epoch?); starting from scratch", run.root)
        return 0, [], dict(NO_BEST)
    ckpt = load_checkpoint(path)
    ckpt.check_matches(config.model, model_identity(module), info)
    ts = ckpt.train_state
    missing = [k for k in ("epoch", "optimizer", "scheduler", "rng", "history") if k not in ts]
    if missing:
        raise CheckpointError(f"{path}: holds no training state to resume from (missing {', '.join(missing)})")
    try:
        module.load_state_dict(ckpt.state_dict)
        optimizer.load_state_dict(ts["optimizer"])
        scheduler.load_state_dict(ts["scheduler"])
        if ts.get("scaler"):
            scaler.load_state_dict(ts["scaler"])
        torch.set_rng_state(ts["rng"]["torch"])
        if "cuda" in ts["rng"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(ts["rng"]["cuda"])
        epoch = int(ts["epoch"])
        history = [dict(r) for r in ts["history"]][:epoch]
    except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as err:
        first = first_line(err)
        raise CheckpointError(f"{path}: cannot resume from it: {first[:200]}") from None
    _warn_changed_settings(config, ts.get("config", {}))
    best = dict(ts.get("best") or NO_BEST)
    log.info("resuming %s from epoch %d", run.root, epoch)
    return epoch, history, best


def _warn_changed_settings(config: TrainConfig, stored: dict[str, Any]) -> None:
    changed = sorted(k for k, v in config.to_dict().items() if k in stored and stored[k] != v)
    if changed:
        log.warning("resuming with changed settings: %s",
                    ", ".join(f"{k}: {stored[k]!r} -> {getattr(config, k)!r}" for k in changed))
