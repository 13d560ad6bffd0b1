"""Logits-only views of a model for the attack libraries, and the deterministic evaluation used to score attacks.

torchattacks and foolbox call ``model(x)`` and expect *one* logits tensor; our models return a structured
:class:`models.network.ModelOutput`. :class:`LogitsView` picks a head and fixes the gate behaviour (forward mode and
routing gradient) for every call the library makes. It does **not** normalise: the model holds its dataset's
mean/std and normalises inside, so attacks work in [0, 1] pixel space. Any ``nn.Module`` is accepted: a model that
is not a :class:`CoarseFineNet` goes through :func:`models.protocol.adapt` first (a plain classifier becomes a
static single-head model), so ``LogitsView(torchvision.models.resnet18())`` works.

:func:`evaluate` is the single place where an attack's outcome is decided: a no-grad forward in a deterministic
gate mode (``hard`` runs the model's real sub-batch execution). A library's own success flag is never used. A
single-head model's coarse predictions are :data:`NO_HEAD` (no coarse label is invented).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import nn

from models.network import CoarseFineNet
from models.protocol import adapt
from models.routing import routing_gradient
from robustness.core.errors import ConfigError
from robustness.core.vocab import HEADS

#: The prediction (and label) of a head the model (or the data) does not have: records keep their int64 columns.
NO_HEAD = -1


def gives_deployed_logits(model: CoarseFineNet, gate_mode: str, gate_grad: str) -> bool:
    """Whether ``model``'s forward under (``gate_mode``, ``gate_grad``) returns exactly the deterministic deployed
    forward's logits, so that an attack may judge its iterate by them instead of running the model again.

    In ``hard`` mode that is the routing gradient's ``exact_on_hard`` (:mod:`models.routing`): ``none`` runs the
    deployed forward, ``bpda`` and ``sharp`` return its logits and add the surrogate's gradient as an exact zero;
    ``ste`` executes gated blocks by masking (``x + v * (f(x) - x)`` is not ``f(x)`` in floating point) and ``eot``
    averages sampled paths: neither is the deployed forward."""
    if not model.is_gated:
        return True
    if gate_mode == "random":
        return False
    return gate_mode != "hard" or routing_gradient(gate_grad).exact_on_hard


class LogitsView(nn.Module):
    """``model`` seen as ``x -> logits`` of one head, with a fixed gate mode and routing gradient.

    Arguments:
        model: a :class:`CoarseFineNet` taking images in [0, 1], or any ``nn.Module`` (adapted with
            :func:`models.protocol.adapt`).
        head: ``fine`` or ``coarse``: whose logits the attack sees.
        gate_mode: forward mode of the gates (``hard``, ``open``, ``soft``, ``random``, ``frozen``).
        gate_grad: routing gradient the attacker sees (``none``, ``ste``, ``bpda``, ``sharp``, ``eot``); it only matters
            for a gated model in ``hard`` mode.
        eot_samples: gate draws averaged per forward when ``gate_grad='eot'``.
        path: bits [B, n_gates] for ``gate_mode='frozen'``.
        temperature: per-gate temperatures [n_gates] of the ``sharp`` routing gradient (calibrated on clean inputs).
        observer: an :class:`attacks.tracking.BestAdversarial` offered every batch the view is called on, with the
            logits when they are exactly the deployed forward's (so that the best iterate is kept whatever the
            library does with it).
        observed_index: the samples of the tracker's batch this view is called on (None: all of them).

    Shapes: input [B, C, H, W] in [0, 1]; output [B, classes].

    The view is always in eval mode (``train()`` is a no-op for the wrapped model): libraries that toggle modes
    cannot switch on BatchNorm statistics updates or training-time gate functions.
    """

    def __init__(self, model: nn.Module, head: str = "fine", gate_mode: str = "hard", gate_grad: str = "none",
                 eot_samples: int = 8, path: torch.Tensor | None = None, temperature: torch.Tensor | None = None,
                 observer: Any = None, observed_index: torch.Tensor | None = None):
        super().__init__()
        if head not in HEADS:
            raise ConfigError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
        model = adapt(model)
        self.model = model
        self.head = head
        self.gate_mode = gate_mode
        self.gate_grad = gate_grad
        self.eot_samples = int(eot_samples)
        self.path = path
        self.temperature = temperature
        self.observer = observer
        self.observed_index = observed_index
        #: whether this view's logits are the deterministic deployed forward's (then they can be offered as is)
        self.deployed = gives_deployed_logits(model, gate_mode, gate_grad)
        model.eval()
        super().train(False)

    def train(self, mode: bool = True) -> "LogitsView":
        """Ignored: the wrapped model stays in eval mode."""
        self.model.eval()
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = {"temperature": self.temperature} if self.temperature is not None else {}
        with self.model.gating(mode=self.gate_mode, gate_grad=self.gate_grad, path=self.path,
                               eot_samples=self.eot_samples, **extra):
            logits = self.model(x).logits(self.head)
        if self.observer is not None:
            self.observer.offer(x, logits if self.deployed else None, self.observed_index)
        return logits


@dataclass
class Evaluation:
    """Outcome of a deterministic forward: predictions of both heads (``coarse`` is :data:`NO_HEAD` for a
    single-head model), executed path bits and MACs per sample."""

    fine: torch.Tensor
    coarse: torch.Tensor
    path: torch.Tensor
    macs: torch.Tensor

    def pred(self, head: str) -> torch.Tensor:
        return self.fine if head == "fine" else self.coarse

    def __iter__(self):
        return iter((self.fine, self.coarse, self.path, self.macs))


@contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (toggled only when the model is training: toggling costs a module walk)."""
    if not model.training:
        yield
        return
    model.eval()
    try:
        yield
    finally:
        model.train(True)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, gate_mode: str = "hard",
             path: torch.Tensor | None = None) -> Evaluation:
    """Predictions, path bits and MACs of ``model`` on ``x`` (no grad, routing gradient ``none``).

    ``gate_mode='hard'`` is the model's real hard forward (skipped blocks are not computed); ``frozen`` needs
    ``path`` (bits [B, n_gates]). Unpacks as ``fine_pred, coarse_pred, path_bits, macs``; ``path_bits`` is a bool
    tensor [B, n_gates] ([B, 0] for a static model).
    """
    if gate_mode == "frozen" and path is None:
        raise ConfigError("evaluate(gate_mode='frozen') needs a path")
    model = adapt(model)
    with _eval_mode(model):
        out = model(x, mode=gate_mode, gate_grad="none", path=path.float() if path is not None else None)
    fine = out.fine.argmax(1)
    coarse = out.coarse.argmax(1) if out.coarse is not None else torch.full_like(fine, NO_HEAD)
    return Evaluation(fine=fine, coarse=coarse, path=out.path > 0.5, macs=out.macs.detach().double())


@torch.no_grad()
def eval_logits(model: nn.Module, x: torch.Tensor, head: str, gate_mode: str = "hard") -> torch.Tensor:
    """Logits of ``head`` under a no-grad deterministic forward in ``gate_mode`` (routing gradient ``none``)."""
    model = adapt(model)
    with _eval_mode(model):
        return model(x, mode=gate_mode, gate_grad="none").logits(head)
