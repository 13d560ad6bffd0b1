"""Constants an evaluation forward derives from parameters once and reuses while the parameters are unchanged.

Two are used by the dsn: a gate head's spatial mean and BatchNorm folded into the linear layer between them (the
head becomes sum -> addmm -> ReLU -> addmm), and the FiLM output of the all-open path (in ``open`` mode every
sample has the same path, so FiLM's ``(1 + gamma, beta)`` is one value for the batch, not a small MLP per sample).

In an evaluation forward (no module in training mode) the folded form is always the one computed, so outputs do
not depend on whether autograd is on; it is cached where nothing differentiates through the parameters (autograd
off, or every parameter frozen, as attacks freeze them: they differentiate with respect to the input only, and the
cached constant carries that gradient like the computation it replaces), and recomputed with autograd otherwise.

Pitfall (torch 2.x): a training-mode ``BatchNorm`` forward updates ``running_mean`` and ``running_var`` inside the
kernel *without* bumping their ``_version``; only ``num_batches_tracked.add_(1)`` bumps one. A cache keyed on the
statistics' versions alone therefore goes stale silently after a training step. The key here holds the version of
every source tensor (``num_batches_tracked`` included), its storage and dtype, and whether inference mode is on (a
constant built under ``torch.inference_mode`` cannot be saved for a later backward).

Pitfall: an edit through ``param.data`` (``p.data.copy_(...)``) bumps no version counter at all. Every owner of a
constant therefore also drops it whenever the module's mode is set (``model.eval()``, ``model.train()``): after
weight surgery through ``.data``, call ``model.eval()`` again, as one does after any change of weights.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn


def in_training(module: nn.Module) -> bool:
    """Whether ``module`` or any submodule (one put in training mode on its own counts too) is in training mode:
    then BatchNorm uses batch statistics and nothing may be folded."""
    return any(m.training for m in module.modules())


def differentiable_or_cached(module: nn.Module, cache: "ParameterConstant", sources: Iterable[torch.Tensor],
                             compute: Callable[[], object], extra: tuple = ()):
    """``compute()`` itself where a gradient must reach ``module``'s parameters (autograd on and a parameter
    that requires it), else the cached value. Both run the same operations on the same values, so a forward
    gives the same bits with and without autograd: an attack's gradient forward and its no-grad scoring agree."""
    if torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters()):
        return compute()
    return cache.get(sources, compute, extra)


class ParameterConstant:
    """A value computed from ``sources`` by ``compute`` and recomputed only when one of them changed."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value = None

    def get(self, sources: Iterable[torch.Tensor], compute: Callable[[], object], extra: tuple = ()):
        """The value, recomputed by ``compute()`` when a source tensor or ``extra`` (plain values) changed."""
        key = (torch.is_inference_mode_enabled(), *extra) + tuple(
            (t.data_ptr(), t._version, t.dtype, t.device) for t in sources)
        if key != self._key:
            with torch.no_grad():
                self._value, self._key = compute(), key
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


def fold_batchnorm(linear_weight: torch.Tensor, bn: nn.BatchNorm1d) -> tuple[torch.Tensor, torch.Tensor]:
    """``(W', b')`` with ``x @ W'.T + b' == bn(x @ W.T)`` for an eval-mode ``bn`` after a bias-free linear ``W``."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return linear_weight * scale[:, None], bn.bias - bn.running_mean * scale


def batchnorm_sources(bn: nn.BatchNorm1d) -> tuple[torch.Tensor, ...]:
    """Every tensor a folded BatchNorm depends on, ``num_batches_tracked`` included (see the module pitfall)."""
    return (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
