"""Staged training of DSN and its static twins, with checkpoints, exact resume on CPU and DDP under ``torchrun``.

The schedule (DESIGN.md, "The model"):

1. **warm-up** (``warmup_epochs``): every gate is open (forward mode ``open``); the network learns its features.
2. **gates on**: the gate function's training relaxation runs (``hardsig`` / ``ste`` / ``gumbel``); the budget and
   ranking terms of the loss are ramped in linearly over ``ramp_epochs`` (per iteration);
3. **slope annealing** (``hardsig`` only): the hard sigmoid's slope ``k`` starts at ``slope_start`` and grows by
   ``slope_growth`` per gated epoch up to ``slope_max`` (CVPR'18 DSN), so the relaxation approaches the hard gate.

Static models (``dual``, ``resnet``) train with the same loop; the gate terms are simply absent.

Optimisation: SGD with momentum, no weight decay on BatchNorm parameters, biases and gates; cosine or step decay
of the learning rate, applied per iteration (optionally after a linear learning-rate warm-up). On CUDA: AMP
(``torch.autocast`` + ``GradScaler``) and channels-last memory. On CPU: float32 and deterministic algorithms.

Randomness: one seed. Data order and augmentation come from ``torch.Generator`` objects seeded from
``(seed, epoch[, rank])``, so they need no saved state; the global torch generator (Gumbel noise, CUDA) is saved in
every checkpoint. On CPU a run that is killed and resumed therefore produces the same metrics, bit for bit, as one
that ran through.

Evaluation (every ``eval_every`` epochs and always after the last) runs in eval mode with the hard, deployed gates:
test accuracy of both heads, the fraction of each branch's gated blocks skipped, mean MACs per sample. The
per-block execution rates on clean test data are stored in the model's ``gate_rate`` buffer (used by the
``random`` control mode).

Run directory (see ``robustness.core.rundir``): ``config.json`` (this module's ``TrainConfig``), ``metrics.csv`` (one row
per epoch), ``checkpoints/last.pt`` (every epoch, with everything needed to resume), ``checkpoints/best.pt`` (best
test fine accuracy; for gated models only epochs after the warm-up compete, so ``best`` is always a skipping
network) and ``train.done``.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import sys
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.checkpoint import load_checkpoint, save_checkpoint
from robustness.core.runtime import DEVICE_CHOICES, resolve_device, seed_everything
from models.gates import GATE_FUNCTIONS, hardsig_slope
from models.losses import LossWeights, dsn_loss
from models.network import CoarseFineNet
from models.registry import create_model, list_models, model_options
from robustness.core.config import build
from robustness.data import CoarseFineDataset, DatasetInfo, dataset_info, list_datasets, load_dataset
from robustness.core.errors import CheckpointError, ConfigError, RunDirError
from robustness.core.rundir import RunDir, atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

#: Columns of ``metrics.csv``, in order. ``skip_*``: fraction of that branch's gated blocks skipped on test data
#: (hard gates). ``macs_saved``: 1 - macs_mean / full MACs. ``gated_macs_saved``: the same relative to the MACs of
#: the gated blocks only (the part skipping can save).
METRIC_COLUMNS = ("epoch", "loss", "ce_fine", "ce_coarse", "budget", "rank", "train_acc_fine", "train_acc_coarse",
                  "test_acc_fine", "test_acc_coarse", "skip_coarse", "skip_fine", "macs_mean", "macs_saved",
                  "gated_macs_saved", "lr", "slope", "seconds")
SCHEDULES = ("cosine", "step")
#: Keys of the model options that come from the dataset, not from the user.
DATASET_DERIVED = ("num_fine", "num_coarse", "image_size", "in_channels", "mean", "std")

Callback = Callable[[int, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


@dataclass
class TrainConfig:
    """Everything one training run needs. Written to ``RUN_DIR/config.json``; ``validate()`` checks it.

    ``model_options`` are ``create_model`` options (depth_n, width, gate_fn, feedback, film, open_bias, ...); the
    dataset supplies num_fine, num_coarse, image_size, in_channels, mean and std. ``data_options`` go to
    ``load_dataset`` (for ``synthetic``: n, image_size, seed, n_coarse, fine_per_coarse). ``train_limit`` /
    ``test_limit`` keep only the first N samples of a split (0: all).
    """

    # what
    model: str = "dsn"
    model_options: dict[str, Any] = field(default_factory=dict)
    dataset: str = "synthetic"
    data_root: str | None = None
    data_options: dict[str, Any] = field(default_factory=dict)
    train_limit: int = 0
    test_limit: int = 0
    # optimisation
    epochs: int = 30
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    milestones: list[int] = field(default_factory=list)  # step schedule; empty: 50% and 75% of the epochs
    gamma: float = 0.1
    lr_warmup_epochs: int = 0
    # DSN stages
    warmup_epochs: int = 2
    ramp_epochs: int = 3
    slope_start: float = 1.0
    slope_growth: float = 1.0
    slope_max: float = 50.0
    # loss (models.losses.LossWeights)
    coarse_weight: float = 1.0
    budget_weight: float = 2.0
    rank_weight: float = 0.5
    target_coarse: float = 0.4
    target_fine: float = 0.7
    rank_margin: float = 0.05
    # augmentation
    augment: bool = True
    crop_padding: int = -1  # -1: image_size // 8 (4 px on 32 px images, as on CIFAR)
    flip: bool = True
    # runtime
    seed: int = 0
    device: str = "auto"
    amp: bool = True  # CUDA only
    channels_last: bool = True  # CUDA only
    deterministic: bool = True
    threads: int = 0  # CPU threads for torch ops; 0: torch's default. 1 is fastest for small models on a busy CPU
    eval_every: int = 1
    eval_batch_size: int = 500

    # -- construction ------------------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any], where: str = "config") -> "TrainConfig":
        """A config from a flat dict such as ``config.json``; unknown keys and bad values are ConfigErrors."""
        if not isinstance(values, dict):
            raise ConfigError(f"{where}: expected a table of options, got {type(values).__name__}")
        config = build(cls, dict(values), where)
        config.validate()
        return config

    @classmethod
    def from_tables(cls, tables: dict[str, dict[str, Any]], base: "TrainConfig | None" = None,
                    where: str = "config file") -> "TrainConfig":
        """Apply a config file's ``[data]``, ``[model]`` and ``[train]`` tables on top of ``base``.

        ``[data]``: ``name``, ``root``, ``train_limit``, ``test_limit``; every other key is a dataset option.
        ``[model]``: ``name``; every other key is a model option. ``[train]``: the remaining fields by name.
        """
        values = (base or cls()).to_dict()
        data = dict(tables.get("data", {}))
        if "name" in data:
            new = data.pop("name")
            if new != values["dataset"]:
                values["data_options"] = {}
            values["dataset"] = new
        if "root" in data:
            values["data_root"] = data.pop("root")
        for key in ("train_limit", "test_limit"):
            if key in data:
                values[key] = data.pop(key)
        values["data_options"] = {**values["data_options"], **data}
        model = dict(tables.get("model", {}))
        if "name" in model:
            values["model"] = model.pop("name")
        values["model_options"] = {**values["model_options"], **model}
        train = dict(tables.get("train", {}))
        reserved = sorted(set(train) & {"model", "model_options", "dataset", "data_root", "data_options",
                                        "train_limit", "test_limit"})
        if reserved:
            raise ConfigError(f"{where}: [train] cannot set {', '.join(reserved)}; use the [data] / [model] tables")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise ConfigError(f"{where}: [train] has unknown option(s) {', '.join(unknown)}; "
                              f"valid: {', '.join(sorted(known))}")
        values.update(train)
        return cls.from_dict(values, where)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict that ``from_dict`` turns back into an equal config."""
        d = asdict(self)
        d["model_options"] = _jsonable(d["model_options"])
        d["data_options"] = _jsonable(d["data_options"])
        return d

    def replace(self, **changes: Any) -> "TrainConfig":
        """A validated copy with ``changes`` (``None`` values are ignored)."""
        values = self.to_dict()
        values.update({k: v for k, v in changes.items() if v is not None})
        return TrainConfig.from_dict(values)

    # -- checks ------------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the first invalid value."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name), f.type)
        if self.model not in list_models():
            raise ConfigError(f"unknown model {self.model!r}; choose one of: {', '.join(list_models())}")
        if self.dataset not in list_datasets():
            raise ConfigError(f"unknown dataset {self.dataset!r}; choose one of: {', '.join(list_datasets())}")
        bad_opts = sorted(set(self.model_options) - set(model_options(self.model)))
        if bad_opts:
            raise ConfigError(f"model {self.model!r} has no option(s) {', '.join(bad_opts)}; "
                              f"valid: {', '.join(model_options(self.model))}")
        gate_fn = self.model_options.get("gate_fn", "hardsig")
        if gate_fn not in GATE_FUNCTIONS:
            raise ConfigError(f"unknown gate function {gate_fn!r}; choose one of: {', '.join(GATE_FUNCTIONS)}")
        checks = [
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 2, f"batch_size must be >= 2 (BatchNorm needs two samples), got {self.batch_size}"),
            (self.lr > 0 and math.isfinite(self.lr), f"lr must be > 0, got {self.lr}"),
            (0 <= self.momentum < 1, f"momentum must be in [0, 1), got {self.momentum}"),
            (self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}; choose one of: {', '.join(SCHEDULES)}"),
            (all(m >= 1 for m in self.milestones) and list(self.milestones) == sorted(self.milestones),
             f"milestones must be increasing epochs >= 1, got {self.milestones}"),
            (0 < self.gamma <= 1, f"gamma must be in (0, 1], got {self.gamma}"),
            (self.lr_warmup_epochs >= 0, f"lr_warmup_epochs must be >= 0, got {self.lr_warmup_epochs}"),
            (self.warmup_epochs >= 0, f"warmup_epochs must be >= 0, got {self.warmup_epochs}"),
            (self.ramp_epochs >= 0, f"ramp_epochs must be >= 0, got {self.ramp_epochs}"),
            (self.slope_start > 0, f"slope_start must be > 0, got {self.slope_start}"),
            (self.slope_growth >= 0, f"slope_growth must be >= 0, got {self.slope_growth}"),
            (self.slope_max >= self.slope_start, f"slope_max ({self.slope_max}) must be >= slope_start "
                                                 f"({self.slope_start})"),
            (self.nesterov is False or self.momentum > 0, "nesterov needs momentum > 0"),
            (self.crop_padding >= -1,
             f"crop_padding must be >= 0 (or -1 for image_size // 8), got {self.crop_padding}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
            (self.device in DEVICE_CHOICES or self.device.startswith("cuda:"),
             f"unknown device {self.device!r}; choose one of: {', '.join(DEVICE_CHOICES)}"),
            (self.eval_every >= 1, f"eval_every must be >= 1, got {self.eval_every}"),
            (self.threads >= 0, f"threads must be >= 0 (0: torch's default), got {self.threads}"),
            (self.eval_batch_size >= 1, f"eval_batch_size must be >= 1, got {self.eval_batch_size}"),
            (self.train_limit >= 0 and self.test_limit >= 0, "train_limit and test_limit must be >= 0 (0: all)"),
        ]
        for name in ("coarse_weight", "budget_weight", "rank_weight", "rank_margin"):
            checks.append((getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}"))
        for name in ("target_coarse", "target_fine"):
            checks.append((0 <= getattr(self, name) <= 1, f"{name} must be in [0, 1], got {getattr(self, name)}"))
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    # -- derived -----------------------------------------------------------------------------------------------
    def loss_weights(self) -> LossWeights:
        return LossWeights(coarse=self.coarse_weight, budget=self.budget_weight, rank=self.rank_weight,
                           target_coarse=self.target_coarse, target_fine=self.target_fine, margin=self.rank_margin)

    def lr_factor(self, t: float) -> float:
        """Learning-rate multiplier at (fractional) epoch ``t`` from the start of training."""
        if self.lr_warmup_epochs > 0 and t < self.lr_warmup_epochs:
            return (t + 1e-3) / self.lr_warmup_epochs
        if self.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(t, self.epochs) / self.epochs))
        milestones = self.milestones or [max(1, round(0.5 * self.epochs)), max(1, round(0.75 * self.epochs))]
        return self.gamma ** sum(1 for m in milestones if int(t) >= m)

    def slope_at(self, epoch: int) -> float:
        """Hard-sigmoid slope of (0-based) ``epoch``: ``slope_start`` during warm-up, then annealed."""
        return hardsig_slope(epoch - self.warmup_epochs, self.slope_start, self.slope_growth, self.slope_max)

    def gate_weight_at(self, epoch: int, fraction: float) -> float:
        """Weight in [0, 1] of the budget and ranking terms at ``fraction`` of (0-based) ``epoch``."""
        gated = epoch - self.warmup_epochs
        if gated < 0:
            return 0.0
        if self.ramp_epochs == 0:
            return 1.0
        return float(min(1.0, (gated + fraction) / self.ramp_epochs))


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "bool": (bool,)}


def _check_type(name: str, value: Any, annotation: Any) -> None:
    text = str(annotation)
    if text.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a table of options, got {value!r}")
        return
    if text.startswith("list"):
        if not isinstance(value, (list, tuple)) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise ConfigError(f"{name} must be a list of integers, got {value!r}")
        return
    if value is None and "None" in text:
        return
    kind = text.split(" ")[0].split("|")[0].strip()
    allowed = _TYPES.get(kind)
    if allowed is None:
        return
    if (kind != "bool" and isinstance(value, bool)) or not isinstance(value, allowed):
        raise ConfigError(f"{name} must be {'a' if kind != 'int' else 'an'} {kind}, got {value!r}")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------------------------
# Result and metrics file
# --------------------------------------------------------------------------------------------------------------


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

    @property
    def history(self) -> list[dict[str, Any]]:
        return read_metrics(RunDir.at(self.run_dir).metrics)


def _fmt_value(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def metrics_csv(rows: Sequence[dict[str, Any]]) -> str:
    """The text of ``metrics.csv`` for ``rows``."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(METRIC_COLUMNS)
    for row in rows:
        writer.writerow([_fmt_value(row.get(c)) for c in METRIC_COLUMNS])
    return buf.getvalue()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``metrics.csv`` (numbers as int / float, empty cells as NaN); [] if there is none."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="", encoding="utf-8") as fh:
        for raw in csv.DictReader(fh):
            row: dict[str, Any] = {}
            for key, text in raw.items():
                if key == "epoch":
                    row[key] = int(text)
                else:
                    try:
                        row[key] = float(text) if text != "" else float("nan")
                    except (TypeError, ValueError):
                        row[key] = text
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------
# Distributed context
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t


def env_world() -> tuple[int, int, int]:
    try:
        return (int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0")),
                int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise ConfigError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun)") from None


@contextmanager
def _distributed(device: torch.device) -> Iterator[_Dist]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), and leave it at the end."""
    world, rank, local_rank = env_world()
    if world <= 1:
        yield _Dist()
        return
    dist = torch.distributed
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend)
    try:
        yield _Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, owns_group=owns)
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Data order and augmentation (torch generators only: their state is a function of seed, epoch and rank)
# --------------------------------------------------------------------------------------------------------------


def _derived_seed(*parts: int) -> int:
    value = 0x9E3779B97F4A7C15
    for p in parts:
        value = (value * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
    return value


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's mini-batches (index tensors) for ``epoch``: a seeded permutation, sliced per rank.

    ``batch_size`` is the global batch; each of ``world`` ranks gets ``batch_size // world`` samples per step and
    every rank gets the same number of steps. A trailing batch of one sample (BatchNorm cannot train on it) is
    dropped.
    """
    gen = torch.Generator().manual_seed(_derived_seed(seed, epoch, 0))
    perm = torch.randperm(n, generator=gen)
    per_rank = max(1, batch_size // world)
    if world > 1:
        usable = (n // world) * world
        perm = perm[:usable][rank::world]
    batches = list(perm.split(per_rank))
    if batches and batches[-1].numel() < 2:
        batches.pop()
    return batches


def augment_batch(x: torch.Tensor, gen: torch.Generator, padding: int, flip: bool) -> torch.Tensor:
    """Random crop after zero padding by ``padding`` pixels and random horizontal flip, per sample."""
    b, _, h, w = x.shape
    if padding > 0:  # the random numbers come from ``gen`` (CPU); the gather runs wherever ``x`` lives
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=gen)
        rows = (oy[:, None] + torch.arange(h))[:, :, None].to(x.device)
        cols = (ox[:, None] + torch.arange(w))[:, None, :].to(x.device)
        batch = torch.arange(b, device=x.device)[:, None, None]
        x = padded[batch, :, rows, cols].permute(0, 3, 1, 2).contiguous()
    if flip:
        mirror = (torch.rand(b, generator=gen) < 0.5).to(x.device)
        x = torch.where(mirror[:, None, None, None], x.flip(3), x)
    return x


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: CoarseFineNet, data: CoarseFineDataset, device: torch.device, batch_size: int = 500,
             mode: str = "hard", amp: bool = False, channels_last: bool = False,
             rank: int = 0, world: int = 1) -> dict[str, Any]:
    """Test metrics of ``model`` (unwrapped) in eval mode and gate ``mode``: accuracies, skip ratios, MACs.

    Under DDP every rank evaluates its share and the sums are all-reduced. Returns ``test_acc_fine``,
    ``test_acc_coarse``, ``skip_coarse``, ``skip_fine``, ``macs_mean``, ``macs_saved``, ``gated_macs_saved`` and
    ``gate_rate`` (per-gate execution rate, path order).
    """
    was_training = model.training
    model.eval()
    names = model.gate_names
    n_coarse = sum(1 for g in names if g.startswith("coarse."))
    sums = torch.zeros(4 + len(names), dtype=torch.float64)
    idx = torch.arange(rank, len(data), world)
    for chunk in idx.split(batch_size):
        x, fine, coarse = data.batch(chunk)
        x = _to_device(x, device, channels_last)
        with _autocast(device, amp):
            out = model(x, mode=mode, grad="none")
        sums[0] += len(chunk)
        sums[1] += (out.fine.argmax(1).cpu() == fine).sum().item()
        sums[2] += (out.coarse.argmax(1).cpu() == coarse).sum().item()
        sums[3] += out.macs.double().sum().item()
        if names:
            sums[4:] += out.path.double().sum(0).cpu()
    if world > 1:
        reduced = sums.to(device)
        torch.distributed.all_reduce(reduced)
        sums = reduced.cpu()
    model.train(was_training)
    count = max(float(sums[0]), 1.0)
    rate = (sums[4:] / count).float()
    gated = model.costs.gated_blocks
    full = model.full_macs
    macs_mean = float(sums[3]) / count
    skip = {"coarse": 0.0, "fine": 0.0}
    if names:
        skip["coarse"] = float(1 - rate[:n_coarse].mean()) if n_coarse else 0.0
        skip["fine"] = float(1 - rate[n_coarse:].mean()) if len(names) > n_coarse else 0.0
    gated_total = float(sum(gated))
    return {
        "test_acc_fine": float(sums[1]) / count,
        "test_acc_coarse": float(sums[2]) / count,
        "skip_coarse": skip["coarse"],
        "skip_fine": skip["fine"],
        "macs_mean": macs_mean,
        "macs_saved": 1.0 - macs_mean / full if full > 0 else 0.0,
        "gated_macs_saved": (full - macs_mean) / gated_total if gated_total > 0 else 0.0,
        "gate_rate": rate,
    }


def _autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def _to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# --------------------------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------------------------


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on convolution and linear weights only: none on BatchNorm parameters, biases and gates."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or ".gates." in f".{name}":
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _has_outputs(run: RunDir) -> bool:
    return any(p.exists() for p in (run.config, run.metrics, run.last_checkpoint, run.best_checkpoint))


def _clear_outputs(run: RunDir) -> None:
    """Remove a previous run's training outputs (``--force``)."""
    for p in (run.train_done, run.metrics, run.last_checkpoint, run.best_checkpoint, run.config):
        p.unlink(missing_ok=True)
    for stale in (run.attacks, run.report):
        if stale.exists():
            log.warning("%s belongs to the previous model; it is stale now", stale)


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

    # -- checks that precede any write ---------------------------------------------------------------------------
    def _check_run_dir(self) -> str:
        """``fresh``, ``unfinished`` or ``done``; raises RunDirError where the flags do not allow going on."""
        run = self.run
        if run.root.exists() and not run.root.is_dir():
            raise RunDirError(f"{run.root} exists and is not a directory")
        if run.train_done.exists():
            if not (self.resume or self.force):
                raise RunDirError(f"{run.root} holds a finished run; pass --resume to keep it (nothing to do) "
                                  f"or --force to train again from scratch")
            return "done"
        if _has_outputs(run):
            if not (self.resume or self.force):
                raise RunDirError(f"{run.root} holds an unfinished run; pass --resume to continue it "
                                  f"or --force to start over")
            return "unfinished"
        return "fresh"

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

    def _model_options(self, info: DatasetInfo) -> dict[str, Any]:
        derived = dict(num_fine=info.num_fine, num_coarse=info.num_coarse, image_size=info.image_size,
                       in_channels=info.channels, mean=tuple(info.mean), std=tuple(info.std))
        opts = dict(self.config.model_options)
        for key, value in derived.items():
            if key in opts:
                given = tuple(opts[key]) if isinstance(opts[key], (list, tuple)) else opts[key]
                if given != value:
                    raise ConfigError(f"model option {key}={opts[key]!r} contradicts dataset {info.name!r} "
                                      f"({key}={value!r}); leave it out, the dataset sets it")
        opts.update(derived)
        return opts

    # -- run -----------------------------------------------------------------------------------------------------
    def run_training(self) -> TrainResult:
        c = self.config
        state = self._check_run_dir()
        if state == "done" and self.resume:
            self._check_finished_run()
            log.info("%s: training already finished; nothing to do (use --force to train again)", self.run.root)
            return self._finished_result(nothing_to_do=True)
        device = resolve_device(c.device)
        with _distributed(device) as dist, self._runtime(device):
            if dist.enabled and device.type == "cuda":
                device = torch.device("cuda", dist.local_rank)
            return self._train(device, dist, state)

    def _check_finished_run(self) -> None:
        """A finished run must be of the model and dataset asked for, or ``--resume`` would silently skip it."""
        path = self.run.last_checkpoint if self.run.last_checkpoint.exists() else self.run.best_checkpoint
        if not path.exists():
            return
        c = self.config
        ckpt = load_checkpoint(path)
        info = dataset_info(c.dataset, c.data_root, **c.data_options)
        wanted = create_model(c.model, **self._model_options(info))  # its config: the options as resolved
        ckpt.check_matches(c.model, _model_identity(wanted), info)

    @contextmanager
    def _runtime(self, device: torch.device) -> Iterator[None]:
        """Thread count and determinism switches for the run; the caller's settings are restored afterwards."""
        import torch.utils.deterministic as det
        previous = (torch.are_deterministic_algorithms_enabled(),
                    torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
        cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        threads = torch.get_num_threads()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        if device.type == "cpu" and self.config.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            det.fill_uninitialized_memory = False  # NaN-filling every new tensor costs time and buys nothing here
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = not self.config.deterministic
            torch.backends.cudnn.deterministic = self.config.deterministic
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
            det.fill_uninitialized_memory = previous[2]
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn
            torch.set_num_threads(threads)

    def _train(self, device: torch.device, dist: _Dist, state: str) -> TrainResult:
        c = self.config
        started = time.perf_counter()
        seed_everything(c.seed)
        train_set, test_set = self._load_data()
        info = train_set.info
        model = create_model(c.model, **self._model_options(info))
        module: CoarseFineNet = model
        if module.is_gated and c.model_options.get("gate_fn", "hardsig") == "hardsig":
            opened = c.slope_start * float(c.model_options.get("open_bias", 2.0)) + 0.5
            if opened >= 1.0:
                log.warning("open_bias %.2f with slope_start %.2f saturates the hard sigmoid (k*s + 0.5 >= 1): the "
                            "gates get no gradient until their score falls below %.2f; consider open_bias < %.2f",
                            c.model_options.get("open_bias", 2.0), c.slope_start, 0.5 / c.slope_start,
                            0.5 / c.slope_start)
        use_amp = c.amp and device.type == "cuda"
        channels_last = c.channels_last and device.type == "cuda"
        model = model.to(device)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(_param_groups(model, c.weight_decay), lr=c.lr, momentum=c.momentum,
                                    nesterov=c.nesterov)
        steps = len(epoch_batches(len(train_set), c.batch_size, c.seed, 0, dist.rank, dist.world))
        if steps == 0:
            raise ConfigError(f"batch_size {c.batch_size} leaves no training batch on {dist.world} process(es)")
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: c.lr_factor(step / steps))
        scaler = torch.amp.GradScaler("cuda", enabled=use_amp)

        start_epoch, history, best = 0, [], {"epoch": None, "test_acc_fine": -1.0}
        if state != "fresh" and self.resume:
            start_epoch, history, best = self._restore(module, optimizer, scheduler, scaler, info, device)
        elif self.resume:
            log.info("%s: nothing to resume; starting a new run", self.run.root)
        # -------- everything is validated: from here on the run directory is written (rank 0 only) --------
        if dist.main:
            if self.force and state != "fresh":
                log.info("%s: --force: discarding the previous run", self.run.root)
                _clear_outputs(self.run)
            self.run.root.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.run.config, c.to_dict())
            if history or start_epoch:
                atomic_write_text(self.run.metrics, metrics_csv(history))
            else:
                self.run.metrics.unlink(missing_ok=True)
        dist.barrier()

        wrapped: nn.Module = model
        if dist.enabled:
            wrapped = nn.parallel.DistributedDataParallel(
                model, device_ids=[dist.local_rank] if device.type == "cuda" else None)
        if dist.rank > 0:  # per-rank Gumbel noise (the weights are rank 0's: DDP broadcasts them)
            torch.manual_seed(_derived_seed(c.seed, dist.rank, start_epoch, 7))
        weights = c.loss_weights()
        padding = (info.image_size // 8 if c.crop_padding < 0 else c.crop_padding) if c.augment else 0
        (log.info if dist.main else log.debug)(
            "training %s on %s (%d train / %d test images) on %s%s: epochs %d..%d of %d", c.model, c.dataset,
            len(train_set), len(test_set), device, f" x{dist.world}" if dist.enabled else "", start_epoch + 1,
            c.epochs, c.epochs)

        for epoch in range(start_epoch, c.epochs):
            t0 = time.perf_counter()
            gated_phase = module.is_gated and epoch >= c.warmup_epochs
            slope = c.slope_at(epoch)
            if hasattr(module, "slope"):
                module.slope.fill_(slope)
            lr = optimizer.param_groups[0]["lr"]
            batches = epoch_batches(len(train_set), c.batch_size, c.seed, epoch, dist.rank, dist.world)
            aug_gen = torch.Generator().manual_seed(_derived_seed(c.seed, epoch, dist.rank, 1))
            model.train()
            sums = torch.zeros(9, dtype=torch.float64)  # n, loss, ce_f, ce_c, budget, rank, acc_f, acc_c, skip
            bar = self._bar(len(batches), epoch, dist)
            try:
                for i, idx in enumerate(batches):
                    x, fine, coarse = train_set.batch(idx)
                    x = x.to(device, non_blocking=True)
                    if padding or (c.augment and c.flip):
                        x = augment_batch(x, aug_gen, padding, c.augment and c.flip)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    fine, coarse = fine.to(device, non_blocking=True), coarse.to(device, non_blocking=True)
                    gate_weight = c.gate_weight_at(epoch, (i + 1) / len(batches)) if module.is_gated else 0.0
                    with _autocast(device, use_amp):
                        out = wrapped(x, mode="hard" if gated_phase else "open")
                        loss, parts = dsn_loss(out, fine, coarse, weights, gate_weight)
                        if dist.enabled and module.is_gated and not gated_phase:
                            # warm-up: the gates score but no loss reads the scores; DDP needs a gradient (zero)
                            # for every parameter it saw in the graph
                            loss = loss + 0.0 * out.path_scores.sum()
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                    scheduler.step()
                    b = len(idx)
                    skip = float((out.path_scores <= 0).float().mean()) if module.is_gated and gated_phase else 0.0
                    acc_f = float((out.fine.argmax(1) == fine).float().sum())
                    acc_c = float((out.coarse.argmax(1) == coarse).float().sum())
                    sums += torch.tensor([b, parts.total * b, parts.ce_fine * b, parts.ce_coarse * b,
                                          parts.budget * b, parts.rank * b, acc_f, acc_c, skip * b],
                                         dtype=torch.float64)
                    if bar is not None:
                        n = float(sums[0])
                        bar.set_postfix(loss=f"{float(sums[1]) / n:.3f}", acc=f"{float(sums[6]) / n:.1%}",
                                        skip=f"{float(sums[8]) / n:.1%}", refresh=False)
                        bar.update(1)
            finally:
                if bar is not None:
                    bar.close()
            if dist.enabled:
                sums = dist.all_reduce(sums.to(device)).cpu()
                for buf in module.buffers():  # BN statistics: rank 0's, as DDP broadcasts them
                    torch.distributed.broadcast(buf, 0)
            n = max(float(sums[0]), 1.0)
            row: dict[str, Any] = {
                "epoch": epoch + 1, "loss": float(sums[1]) / n, "ce_fine": float(sums[2]) / n,
                "ce_coarse": float(sums[3]) / n, "budget": float(sums[4]) / n, "rank": float(sums[5]) / n,
                "train_acc_fine": float(sums[6]) / n, "train_acc_coarse": float(sums[7]) / n,
            }
            last_epoch = epoch + 1 == c.epochs
            if (epoch + 1) % c.eval_every == 0 or last_epoch:
                ev = evaluate(module, test_set, device, c.eval_batch_size, "hard", use_amp, channels_last,
                              dist.rank, dist.world)
                if module.is_gated:
                    module.gate_rate.copy_(ev.pop("gate_rate").to(module.gate_rate))
                else:
                    ev.pop("gate_rate")
                row.update(ev)
            row.update({"lr": lr, "slope": slope, "seconds": time.perf_counter() - t0})
            history.append(row)
            eligible = not module.is_gated or epoch >= c.warmup_epochs or c.epochs <= c.warmup_epochs
            improved = eligible and not math.isnan(row.get("test_acc_fine", float("nan"))) \
                and row["test_acc_fine"] > best["test_acc_fine"]
            if improved:
                best = {"epoch": epoch + 1, "test_acc_fine": row["test_acc_fine"]}
            if dist.main:
                metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))}
                if improved:
                    save_checkpoint(self.run.best_checkpoint, module, info,
                                    {"epoch": epoch + 1, "config": c.to_dict()}, metrics)
                save_checkpoint(self.run.last_checkpoint, module, info,
                                self._train_state(epoch + 1, optimizer, scheduler, scaler, history, best), metrics)
                atomic_write_text(self.run.metrics, metrics_csv(history))
            if dist.main:
                log.info(_epoch_line(row, c.epochs, module.is_gated))
            for callback in self.callbacks:
                callback(epoch + 1, dict(row))

        if dist.main:
            summary = {"epochs": c.epochs, "best_epoch": best["epoch"], "last": history[-1] if history else {}}
            atomic_write_json(self.run.train_done, summary)
        dist.barrier()
        result = self._finished_result(history=history, best_epoch=best["epoch"], module=module)
        result.seconds = time.perf_counter() - started
        result.resumed_from = start_epoch
        return result

    def _bar(self, total: int, epoch: int, dist: _Dist):
        if not self.progress or not dist.main or not sys.stderr.isatty():
            return None
        from tqdm import tqdm
        return tqdm(total=total, desc=f"epoch {epoch + 1}/{self.config.epochs}", leave=False, dynamic_ncols=True)

    def _train_state(self, epoch: int, optimizer, scheduler, scaler, history, best) -> dict[str, Any]:
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
            "data_generator": {"seed": self.config.seed, "next_epoch": epoch, "kind": "torch.Generator per epoch"},
            "history": [dict(r) for r in history],
            "best": dict(best),
            "config": self.config.to_dict(),
        }

    def _restore(self, module: CoarseFineNet, optimizer, scheduler, scaler, info: DatasetInfo,
                 device: torch.device) -> tuple[int, list[dict[str, Any]], dict[str, Any]]:
        """Load ``last.pt`` into the model and optimiser after checking it belongs to this config."""
        path = self.run.last_checkpoint
        if not path.exists():
            log.info("%s: no checkpoint yet (killed during the first epoch?); starting from scratch", self.run.root)
            return 0, [], {"epoch": None, "test_acc_fine": -1.0}
        ckpt = load_checkpoint(path)
        ckpt.check_matches(self.config.model, _model_identity(module), info)
        ts = ckpt.train_state
        needed = ("epoch", "optimizer", "scheduler", "rng", "history")
        missing = [k for k in needed if k not in ts]
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
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise CheckpointError(f"{path}: cannot resume from it: {first[:200]}") from None
        stored = ts.get("config", {})
        changed = sorted(k for k, v in self.config.to_dict().items() if k in stored and stored[k] != v)
        if changed:
            log.warning("resuming with changed settings: %s", ", ".join(f"{k}: {stored[k]!r} -> "
                                                                        f"{getattr(self.config, k)!r}"
                                                                        for k in changed))
        best = dict(ts.get("best") or {"epoch": None, "test_acc_fine": -1.0})
        log.info("resuming %s from epoch %d", self.run.root, epoch)
        return epoch, history, best

    def _finished_result(self, history: list[dict[str, Any]] | None = None, best_epoch: int | None = None,
                         module: CoarseFineNet | None = None, nothing_to_do: bool = False) -> TrainResult:
        if history is None:
            history = read_metrics(self.run.metrics)
        if best_epoch is None and self.run.train_done.is_file():
            try:
                best_epoch = json.loads(self.run.train_done.read_text(encoding="utf-8")).get("best_epoch")
            except (ValueError, AttributeError, OSError):
                best_epoch = None
        best = next((dict(r) for r in history if r["epoch"] == best_epoch), {})
        result = TrainResult(run_dir=self.run.root, config=self.config, epochs=len(history), best_epoch=best_epoch,
                             best=best, last=dict(history[-1]) if history else {}, seconds=0.0,
                             nothing_to_do=nothing_to_do)
        if module is not None:
            result.full_macs = module.full_macs
            result.gated_macs = float(sum(module.costs.gated_blocks))
        return result


def _model_identity(module: CoarseFineNet) -> dict[str, Any]:
    allowed = set(model_options(module.model_name))
    return {k: v for k, v in module.config.items() if k in allowed}


def _epoch_line(row: dict[str, Any], epochs: int, gated: bool) -> str:
    line = (f"epoch {row['epoch']}/{epochs}  loss {row['loss']:.3f}  "
            f"train {row['train_acc_fine']:.1%}/{row['train_acc_coarse']:.1%}")
    if "test_acc_fine" in row:
        line += f"  test fine {row['test_acc_fine']:.1%} coarse {row['test_acc_coarse']:.1%}"
        if gated:
            line += (f"  skip coarse {row['skip_coarse']:.1%} fine {row['skip_fine']:.1%}"
                     f"  MACs saved {row['macs_saved']:.1%} (gated {row['gated_macs_saved']:.1%})")
    return line + f"  lr {row['lr']:.4f}  {row['seconds']:.1f}s"


def train(config: TrainConfig, run_dir: str | Path, resume: bool = False, force: bool = False,
          callbacks: Sequence[Callback] | None = None, progress: bool = True) -> TrainResult:
    """Train ``config`` into ``run_dir`` (see the module docstring); returns what it produced.

    ``resume`` continues from ``checkpoints/last.pt`` (a finished run: nothing to do); ``force`` discards a previous
    run. Nothing in ``run_dir`` is written before the config, the data and any checkpoint have been checked.
    ``callbacks`` are called as ``fn(epoch, metrics_row)`` after each epoch is saved. Under ``torchrun`` (WORLD_SIZE
    > 1) the run is data-parallel and only rank 0 writes files.
    """
    return Trainer(config, run_dir, resume=resume, force=force, callbacks=callbacks, progress=progress).run_training()
