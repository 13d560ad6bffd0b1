"""The training loop: ``Trainer`` (one run: setup, epochs of steps, end-of-epoch bookkeeping) and ``train()``.

Each epoch trains on the seeded batches of ``models.training.schedule`` in the stage's gate mode (``open`` during
the warm-up, then the gate function's relaxation under ``hard``), evaluates every ``eval_every`` epochs and after
the last (``models.training.metrics``), and saves ``last.pt`` (and ``best.pt`` on improvement) and
``metrics.csv``. Under ``torchrun`` the model is wrapped in DDP and only rank 0 writes. The run directory's writer lock
(:meth:`robustness.core.rundir.RunDir.writing`) is held for the whole run, so a second ``train`` or an ``attack`` on
the same directory is one line, not a mix.

Stopping: Ctrl-C and SIGTERM (:func:`robustness.core.signals.graceful_termination`, also installed here when
nobody handles SIGTERM: the Python API, a pipeline's training worker) unwind the epoch in progress; the checkpoint
of the last finished epoch stays, a checkpoint being written is dropped (``atomic_write``), the lock is released,
and ``--resume`` continues from that epoch. Before anything is read or written, the model's weights are estimated
(:func:`model_memory`) against the memory available: a ``width`` or ``depth_n`` that cannot fit is one line.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn

from models.checkpoint import save_checkpoint
from models.losses import LossWeights, dsn_loss
from models.network import CoarseFineNet
from models.registry import create_model, own_options, resolved_options
from models.training import resume as resuming
from models.training.config import TrainConfig, model_kwargs
from models.training.metrics import epoch_line, evaluate, metrics_csv, read_metrics
from models.training.optim import make_optimisation
from models.training.runtime import autocast, run_settings
from models.training.schedule import augment_batch, augmentation_generator, epoch_batches
from robustness.core.errors import ConfigError, RunDirError
from robustness.core.progress import is_terminal, progress_bar
from robustness.core.files import atomic_write_json, atomic_write_text
from robustness.core.rundir import RunDir
from robustness.core.runtime import (Distributed, accumulation_dtype, check_memory, derive_seed, distributed,
                                     resolve_device, seed_everything)
from robustness.core.signals import graceful_termination, raise_if_terminating
from robustness.data import CoarseFineDataset, DatasetInfo, load_dataset

log = logging.getLogger(__name__)

Callback = Callable[[int, dict[str, Any]], None]


@dataclass
class TrainResult:
    """What a training run produced. ``best`` / ``last`` are metrics rows (see ``METRIC_COLUMNS``)."""

    run_dir: Path
    config: TrainConfig
    epochs: int
    best_epoch: int | None
    best: dict[str, Any]
    last: dict[str, Any]
    seconds: float
    full_macs: float = float("nan")
    gated_macs: float = float("nan")
    resumed_from: int = 0
    nothing_to_do: bool = False


@dataclass
class _Session:
    """A run in progress: what its epochs share."""

    device: torch.device
    dist: Distributed
    train_set: CoarseFineDataset
    test_set: CoarseFineDataset
    model: CoarseFineNet  # unwrapped
    wrapped: nn.Module  # the model, or its DDP wrapper
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    use_amp: bool
    channels_last: bool
    padding: int
    weights: LossWeights
    start_epoch: int
    history: list[dict[str, Any]]
    best: dict[str, Any]

    @property
    def info(self) -> DatasetInfo:
        return self.train_set.info


class Trainer:
    """One training run: data, model, optimiser, schedule, run directory. Use ``train()`` for the whole thing."""

    def __init__(self, config: TrainConfig, run_dir: str | Path, resume: bool = False, force: bool = False,
                 callbacks: Sequence[Callback] | None = None, progress: bool = True):
        config.validate()
        if resume and force:
            raise ConfigError("--resume and --force exclude each other: resume continues a run, force discards it")
        self.config = config
        self.run = RunDir.at(run_dir)
        self.resume = resume
        self.force = force
        self.callbacks = list(callbacks or [])
        self.progress = progress

    def run_training(self) -> TrainResult:
        with graceful_termination():  # a no-op under the CLI, which installed it for the whole command
            raise_if_terminating()  # a worker asked to stop starts no further training
            check_memory(f"model {self.config.model} ({_size_options(self.config)})", model_memory(self.config),
                         "lower width or depth_n")
            with self.run.writing("train"):
                return self._run_training()

    def _run_training(self) -> TrainResult:
        c = self.config
        state = resuming.run_state(self.run, self.resume, self.force)
        if state == "done" and self.resume:
            resuming.check_finished_run(self.run, c)
            log.info("%s: training already finished; nothing to do (use --force to train again)", self.run.root)
            return self._finished_result(nothing_to_do=True)
        device = resolve_device(c.device)
        with distributed(device) as dist, run_settings(c, device):
            if dist.enabled and device.type == "cuda":
                device = torch.device("cuda", dist.local_rank)
            return self._train(device, dist, state)

    def _train(self, device: torch.device, dist: Distributed, state: str) -> TrainResult:
        started = time.perf_counter()
        session = self._setup(device, dist, state)
        for epoch in range(session.start_epoch, self.config.epochs):
            t0 = time.perf_counter()
            row, lr, slope = self._train_epoch(session, epoch)
            self._end_epoch(session, epoch, row, lr, slope, t0)
        return self._finish(session, started)

    # -- setup ---------------------------------------------------------------------------------------------------
    def _load_data(self) -> tuple[CoarseFineDataset, CoarseFineDataset]:
        c = self.config
        train = load_dataset(c.dataset, "train", root=c.data_root, **c.data_options)
        test = load_dataset(c.dataset, "test", root=c.data_root, **c.data_options)
        if c.train_limit:
            train = train.subset(c.train_limit)
        if c.test_limit:
            test = test.subset(c.test_limit)
        if len(train) < 2 or len(test) < 1:
            raise ConfigError(f"{c.dataset}: {len(train)} training and {len(test)} test samples are too few to train")
        differences = train.info.differences(test.info)
        if differences:
            raise ConfigError(f"{c.dataset}: train and test splits differ: {'; '.join(differences)}")
        return train, test

    def _build_model(self, info: DatasetInfo) -> CoarseFineNet:
        c = self.config
        model: CoarseFineNet = create_model(c.model, **model_kwargs(c, info))
        open_bias = model.config.get("open_bias")  # as resolved: given or the model's default
        if model.is_gated and model.config.get("gate_fn") == "hardsig" and open_bias is not None:
            if c.slope_start * float(open_bias) + 0.5 >= 1.0:
                log.warning("open_bias %.2f with slope_start %.2f saturates the hard sigmoid (k*s + 0.5 >= 1): the "
                            "gates get no gradient until their score falls below %.2f; consider open_bias < %.2f",
                            open_bias, c.slope_start, 0.5 / c.slope_start, 0.5 / c.slope_start)
        return model

    def _setup(self, device: torch.device, dist: Distributed, state: str) -> _Session:
        """Data, model, optimiser and (with ``--resume``) the saved state; then the run directory is written."""
        c = self.config
        seed_everything(c.seed)
        train_set, test_set = self._load_data()
        model = self._build_model(train_set.info)
        use_amp = c.amp and device.type == "cuda"
        channels_last = c.channels_last and device.type == "cuda"
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        steps = len(epoch_batches(len(train_set), c.batch_size, c.seed, 0, dist.rank, dist.world))
        if steps == 0:
            raise ConfigError(f"batch_size {c.batch_size} leaves no training batch on {dist.world} process(es)")
        padding = (train_set.info.image_size // 8 if c.crop_padding < 0 else c.crop_padding) if c.augment else 0
        if padding > train_set.info.image_size:
            raise ConfigError(f"crop_padding {c.crop_padding} is larger than the {train_set.info.image_size}-pixel "
                              f"images of {c.dataset}; use at most {train_set.info.image_size} (-1: image_size // 8)")
        optimizer, scheduler, scaler = make_optimisation(model, c, steps, use_amp)
        start_epoch, history, best = 0, [], dict(resuming.NO_BEST)
        if state != "fresh" and self.resume:
            start_epoch, history, best = resuming.restore(self.run, c, model, optimizer, scheduler, scaler,
                                                          train_set.info)
        elif self.resume:
            log.info("%s: nothing to resume; starting a new run", self.run.root)
        # everything is validated: from here on the run directory is written (rank 0 only)
        if dist.main:
            self._write_start(state, history, start_epoch)
        dist.barrier()
        wrapped: nn.Module = model
        if dist.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
        if dist.rank > 0:  # per-rank Gumbel noise (the weights are rank 0's: DDP broadcasts them)
            torch.manual_seed(derive_seed(c.seed, dist.rank, start_epoch, 7))
        (log.info if dist.main else log.debug)(
            "training %s on %s (%d train / %d test images) on %s%s: epochs %d..%d of %d", c.model, c.dataset,
            len(train_set), len(test_set), device, f" x{dist.world}" if dist.enabled else "", start_epoch + 1,
            c.epochs, c.epochs)
        return _Session(device, dist, train_set, test_set, model, wrapped, optimizer, scheduler, scaler, use_amp,
                        channels_last, padding, c.loss_weights(), start_epoch, history, best)

    def _write_start(self, state: str, history: list[dict[str, Any]], start_epoch: int) -> None:
        if self.force and state != "fresh":
            log.info("%s: --force: discarding the previous run", self.run.root)
            resuming.clear_outputs(self.run)
        self.run.root.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.run.config, self.config.to_dict())
        if history or start_epoch:
            atomic_write_text(self.run.metrics, metrics_csv(history))
        else:
            self.run.metrics.unlink(missing_ok=True)

    # -- one epoch -----------------------------------------------------------------------------------------------
    def _train_epoch(self, s: _Session, epoch: int) -> tuple[dict[str, Any], float, float]:
        """Train ``epoch``; returns its training metrics, its learning rate and its slope."""
        c = self.config
        gated_phase = s.model.is_gated and epoch >= c.warmup_epochs
        slope = c.slope_at(epoch)
        if hasattr(s.model, "slope"):
            s.model.slope.fill_(slope)
        lr = s.optimizer.param_groups[0]["lr"]
        batches = epoch_batches(len(s.train_set), c.batch_size, c.seed, epoch, s.dist.rank, s.dist.world)
        aug_gen = augmentation_generator(c.seed, epoch, s.dist.rank)
        s.model.train()
        # n, loss, ce_f, ce_c, budget, rank, acc_f, acc_c, skip: summed on the device, read back once per epoch
        sums = torch.zeros(9, dtype=accumulation_dtype(s.device), device=s.device)
        bar = self._bar(len(batches), epoch, s.dist)
        try:
            for i, idx in enumerate(batches):
                gate_weight = c.gate_weight_at(epoch, (i + 1) / len(batches)) if s.model.is_gated else 0.0
                sums += self._step(s, idx, gate_weight, gated_phase, aug_gen)
                if bar is not None:
                    n = float(sums[0])
                    bar.set_postfix(loss=f"{float(sums[1]) / n:.3f}", acc=f"{float(sums[6]) / n:.1%}",
                                    skip=f"{float(sums[8]) / n:.1%}", refresh=False)
                    bar.update(1)
        finally:
            if bar is not None:
                bar.close()
        if s.dist.enabled:
            sums = s.dist.all_reduce(sums)
            for buf in s.model.buffers():  # BN statistics: rank 0's, as DDP broadcasts them
                torch.distributed.broadcast(buf, 0)
        sums = sums.cpu().double()
        n = max(float(sums[0]), 1.0)
        row: dict[str, Any] = {
            "epoch": epoch + 1, "loss": float(sums[1]) / n, "ce_fine": float(sums[2]) / n,
            "ce_coarse": float(sums[3]) / n, "budget": float(sums[4]) / n, "rank": float(sums[5]) / n,
            "train_acc_fine": float(sums[6]) / n, "train_acc_coarse": float(sums[7]) / n,
        }
        return row, lr, slope

    def _step(self, s: _Session, idx: torch.Tensor, gate_weight: float, gated_phase: bool,
              aug_gen: torch.Generator) -> torch.Tensor:
        """One optimisation step on batch ``idx``; returns its sums (see ``_train_epoch``)."""
        c = self.config
        x, fine, coarse = s.train_set.batch(idx)
        x = x.to(s.device, non_blocking=True)
        if s.padding or (c.augment and c.flip):
            x = augment_batch(x, aug_gen, s.padding, c.augment and c.flip)
        if s.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        fine, coarse = fine.to(s.device, non_blocking=True), coarse.to(s.device, non_blocking=True)
        with autocast(s.device, s.use_amp):
            out = s.wrapped(x, mode="hard" if gated_phase else "open")
            loss, parts = dsn_loss(out, fine, coarse, s.weights, gate_weight)
            if s.dist.enabled and s.model.is_gated and not gated_phase:
                # warm-up: the gates score but no loss reads the scores; DDP needs a gradient (zero) for every
                # parameter it saw in the graph
                loss = loss + 0.0 * out.path_scores.sum()
        s.optimizer.zero_grad(set_to_none=True)
        s.scaler.scale(loss).backward()
        s.scaler.step(s.optimizer)
        s.scaler.update()
        s.scheduler.step()
        with torch.no_grad():  # every figure stays on the device: no step waits for the GPU to report
            terms = parts.stacked()
            b = terms.new_tensor([float(len(idx))])
            skip = ((out.path_scores <= 0).to(terms.dtype).mean(1).sum().view(1) if s.model.is_gated and gated_phase
                    else terms.new_zeros(1))
            correct = torch.stack([(out.fine.argmax(1) == fine).sum(), (out.coarse.argmax(1) == coarse).sum()])
            return torch.cat([b, terms * b, correct.to(terms.dtype), skip])

    def _bar(self, total: int, epoch: int, dist: Distributed):
        # off a terminal the epoch's own log line is the line-based progress; a per-batch line would also read the
        # running sums back every batch (a host sync per step on a GPU)
        if not self.progress or not dist.main or not is_terminal():
            return None
        return progress_bar(total=total, desc=f"epoch {epoch + 1}/{self.config.epochs}", unit="batch", leave=False)

    # -- end of an epoch -----------------------------------------------------------------------------------------
    def _end_epoch(self, s: _Session, epoch: int, row: dict[str, Any], lr: float, slope: float, t0: float) -> None:
        """Evaluate (when due), record the row, keep the best, save checkpoints and metrics, call the callbacks."""
        c = self.config
        if (epoch + 1) % c.eval_every == 0 or epoch + 1 == c.epochs:
            row.update(self._evaluate(s))
        row.update({"lr": lr, "slope": slope, "seconds": time.perf_counter() - t0})
        s.history.append(row)
        eligible = not s.model.is_gated or epoch >= c.warmup_epochs or c.epochs <= c.warmup_epochs
        improved = eligible and not math.isnan(row.get("test_acc_fine", float("nan"))) \
            and row["test_acc_fine"] > s.best["test_acc_fine"]
        if improved:
            s.best = {"epoch": epoch + 1, "test_acc_fine": row["test_acc_fine"]}
        if s.dist.main:
            self._save_epoch(s, epoch, row, improved)
            log.info(epoch_line(row, c.epochs, s.model.is_gated))
        for callback in self.callbacks:
            callback(epoch + 1, dict(row))

    def _evaluate(self, s: _Session) -> dict[str, Any]:
        """Test metrics with hard gates; the measured per-gate rates go into the model's ``gate_rate``."""
        c = self.config
        ev = evaluate(s.model, s.test_set, s.device, c.eval_batch_size, "hard", s.use_amp, s.channels_last,
                      s.dist.rank, s.dist.world)
        rate = ev.pop("gate_rate")
        if s.model.is_gated:
            s.model.gate_rate.copy_(rate.to(s.model.gate_rate))
        return ev

    def _save_epoch(self, s: _Session, epoch: int, row: dict[str, Any], improved: bool) -> None:
        c = self.config
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
        if improved:
            save_checkpoint(self.run.best_checkpoint, s.model, s.info, {"epoch": epoch + 1, "config": c.to_dict()},
                            metrics)
        state = resuming.train_state(c, epoch + 1, s.optimizer, s.scheduler, s.scaler, s.history, s.best)
        save_checkpoint(self.run.last_checkpoint, s.model, s.info, state, metrics)
        atomic_write_text(self.run.metrics, metrics_csv(s.history))

    def _finish(self, s: _Session, started: float) -> TrainResult:
        if s.dist.main:
            summary = {"epochs": self.config.epochs, "best_epoch": s.best["epoch"],
                       "last": s.history[-1] if s.history else {}}
            atomic_write_json(self.run.train_done, summary)
        s.dist.barrier()
        result = self._finished_result(history=s.history, best_epoch=s.best["epoch"], module=s.model)
        result.seconds = time.perf_counter() - started
        result.resumed_from = s.start_epoch
        return result

    def _finished_result(self, history: list[dict[str, Any]] | None = None, best_epoch: int | None = None,
                         module: CoarseFineNet | None = None, nothing_to_do: bool = False) -> TrainResult:
        if history is None:
            history = read_metrics(self.run.metrics)
        if best_epoch is None:
            best_epoch = self._stored_best_epoch()
        best = next((dict(r) for r in history if r["epoch"] == best_epoch), {})
        result = TrainResult(run_dir=self.run.root, config=self.config, epochs=len(history), best_epoch=best_epoch,
                             best=best, last=dict(history[-1]) if history else {}, seconds=0.0,
                             nothing_to_do=nothing_to_do)
        if module is not None:
            result.full_macs = module.full_macs
            result.gated_macs = float(sum(module.costs.gated_blocks))
        return result

    def _stored_best_epoch(self) -> int | None:
        """``best_epoch`` of ``train.done``; None when there is none (or only a bare marker file)."""
        try:
            done = self.run.read_train_done()
        except RunDirError:
            return None
        return done.get("best_epoch") if done else None


#: float32 weights per depth_n x width**2 of the smallest built-in architecture (resnet: about 360; dsn and dual
#: about 720), and of a gate head per depth_n x width x gate_hidden: a lower bound, so that only what cannot fit is
#: refused
_WEIGHTS_PER_N_W2 = 350
_GATE_WEIGHTS_PER_N_W_H = 6
#: the copies of the weights training keeps at once: weights, gradients, SGD momentum, the checkpoint being saved
_TRAINING_COPIES = 4


def model_memory(config: TrainConfig) -> int:
    """A lower bound of the bytes that training ``config.model`` takes for its weights, gradients, momentum and
    checkpoint (ResNet-6n+2 stages of ``width``, ``2 width``, ``4 width`` channels); 0 for a model without
    ``depth_n`` and ``width`` options (a plug-in)."""
    options = _size_values(config)
    n, w = options.get("depth_n"), options.get("width")
    if not isinstance(n, int) or not isinstance(w, int) or n < 1 or w < 1:
        return 0  # the model's own checks refuse it
    h = options.get("gate_hidden")
    weights = _WEIGHTS_PER_N_W2 * n * w * w + (_GATE_WEIGHTS_PER_N_W_H * n * w * h if isinstance(h, int) and h > 0
                                               else 0)
    return 4 * weights * _TRAINING_COPIES


def _size_values(config: TrainConfig) -> dict[str, Any]:
    try:
        return resolved_options(config.model, own_options(config.model, config.model_options))
    except ConfigError:
        return {}


def _size_options(config: TrainConfig) -> str:
    values = _size_values(config)
    return ", ".join(f"{k}={values[k]}" for k in ("depth_n", "width", "gate_hidden") if k in values)


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, force: bool = False,
          callbacks: Sequence[Callback] | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` into ``run_dir`` (see ``models.training``); returns what it produced.

    ``resume`` continues from ``checkpoints/last.pt`` (a finished run: nothing to do); ``force`` discards a previous
    run. Nothing in ``run_dir`` is written before the config, the data and any checkpoint have been checked.
    ``callbacks`` are called as ``fn(epoch, metrics_row)`` after each epoch is saved. Under ``torchrun`` (WORLD_SIZE
    > 1) the run is data-parallel and only rank 0 writes files.
    """
    return Trainer(config, run_dir, resume=resume, force=force, callbacks=callbacks, progress=progress).run_training()
