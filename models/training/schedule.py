"""The training schedule: learning-rate factor, hard-sigmoid slope, gate-weight ramp, data order, augmentation.

Data order and augmentation use ``torch.Generator`` objects seeded from ``(seed, epoch[, rank])`` with
``robustness.core.runtime.derive_seed``, so they need no saved state: a resumed run draws what an uninterrupted
one would have drawn.
"""
from __future__ import annotations

import math
from typing import Protocol

import torch
from torch.nn import functional as F

from models.gates import hardsig_slope
from robustness.core.runtime import derive_seed


class Schedule(Protocol):
    """The training settings the schedules read (:class:`models.training.config.TrainConfig` is one); a protocol,
    so this module does not import the config that imports it."""

    epochs: int
    schedule: str
    milestones: list[int]
    gamma: float
    lr_warmup_epochs: int
    lr_warmup_start: float
    warmup_epochs: int
    ramp_epochs: int
    slope_start: float
    slope_growth: float
    slope_max: float


def lr_factor(config: Schedule, t: float) -> float:
    """Learning-rate multiplier at (fractional) epoch ``t`` from the start of training.

    During ``lr_warmup_epochs`` it ramps linearly from ``lr_warmup_start`` (at t = 0) to 1, then follows the
    schedule. The start is a tenth of the peak by default, as He et al. 2016 warm ResNet-110 up (0.01 against
    0.1); earlier versions started at a thousandth, which left the first epoch of a paper-scale run at ~1e-4 and
    learning nothing.
    """
    c = config
    if c.lr_warmup_epochs > 0 and t < c.lr_warmup_epochs:
        return c.lr_warmup_start + (1.0 - c.lr_warmup_start) * max(t, 0.0) / c.lr_warmup_epochs
    if c.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * min(t, c.epochs) / c.epochs))
    milestones = c.milestones or [max(1, round(0.5 * c.epochs)), max(1, round(0.75 * c.epochs))]
    return c.gamma ** sum(1 for m in milestones if int(t) >= m)


def slope_at(config: Schedule, epoch: int) -> float:
    """Hard-sigmoid slope of (0-based) ``epoch``: ``slope_start`` during warm-up, then annealed."""
    c = config
    return hardsig_slope(epoch - c.warmup_epochs, c.slope_start, c.slope_growth, c.slope_max)


def gate_weight_at(config: Schedule, epoch: int, fraction: float) -> float:
    """Weight in [0, 1] of the budget and ranking terms at ``fraction`` of (0-based) ``epoch``."""
    gated = epoch - config.warmup_epochs
    if gated < 0:
        return 0.0
    if config.ramp_epochs == 0:
        return 1.0
    return float(min(1.0, (gated + fraction) / config.ramp_epochs))


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> list[torch.Tensor]:
    """This rank's mini-batches (index tensors) for ``epoch``: a seeded permutation, sliced per rank.

    ``batch_size`` is the global batch; each of ``world`` ranks gets ``batch_size // world`` samples per step and
    every rank gets the same number of steps. A trailing batch of one sample (BatchNorm cannot train on it) is
    dropped.
    """
    gen = torch.Generator().manual_seed(derive_seed(seed, epoch, 0))
    perm = torch.randperm(n, generator=gen)
    per_rank = max(1, batch_size // world)
    if world > 1:
        usable = (n // world) * world
        perm = perm[:usable][rank::world]
    batches = list(perm.split(per_rank))
    if batches and batches[-1].numel() < 2:
        batches.pop()
    return batches


def augmentation_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """The generator of ``epoch``'s crops and flips on ``rank``."""
    return torch.Generator().manual_seed(derive_seed(seed, epoch, rank, 1))


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
