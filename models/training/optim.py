"""The optimiser of a run: SGD with momentum, weight decay on weights only, the per-iteration LR schedule, AMP.

No weight decay on BatchNorm parameters, biases and gates; the learning rate follows
``models.training.schedule.lr_factor`` per iteration; on CUDA with AMP a ``GradScaler`` scales the loss.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.training.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
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


def make_optimisation(model: nn.Module, config: TrainConfig, steps_per_epoch: int, use_amp: bool
                      ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR, torch.amp.GradScaler]:
    """Optimiser, per-iteration LR scheduler and gradient scaler for ``model`` under ``config``."""
    c = config
    optimizer = torch.optim.SGD(param_groups(model, c.weight_decay), lr=c.lr, momentum=c.momentum,
                                nesterov=c.nesterov)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: c.lr_factor(step / steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    return optimizer, scheduler, scaler
