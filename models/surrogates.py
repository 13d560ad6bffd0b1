"""The network an attacker differentiates for each routing gradient, and how faithful it is to the deployed one.

A routing gradient (``gate_grad``, :mod:`models.routing`) keeps the hard network's forward values but takes its
gradient from a surrogate (each entry's :meth:`~models.routing.RoutingGradient.surrogate`): ``none``/``ste`` the
hard network itself, ``bpda`` the soft network (every gated block mixed by ``sigmoid(s)``), ``sharp`` the sharpened
soft network (mixed by ``sigmoid(s / T)``), ``eot`` the average over Bernoulli(sigmoid(s)) gate draws. A
surrogate that predicts differently from the hard network points the attack at the wrong function;
:func:`surrogate_fidelity` measures how often its prediction agrees.

``sharp``'s temperature ``T_l = median_b |s_l,b| / k`` (models/gates.py, ``sharpening_temperature``) is
calibrated once on clean inputs (:func:`calibrate_temperature`) and held fixed for an attack.

Choice of ``k = SHARPNESS = 4``, measured on the quickstart dsn (STE-trained, 4 gates, median ``|s|`` per gate
0.12 / 0.0010 / 0.0002 / 0.0048; first 64 test samples; fine head unless said):

* ``bpda``: 7 % of gate values within 0.05 of 0 or 1; argmax fidelity 0.98 (coarse 0.98); mean ``|logit error|``
  0.30 of the logits' std.
* ``sharp`` with k = 1 / 2 / 4 / 8 / 16: 22 / 38 / 60 / 74 / 86 % of values near 0/1; fidelity 1.0 for every k
  (coarse 0.98 up to k = 4, then 1.0); logit error 0.19 / 0.13 / 0.08 / 0.05 / 0.03. Input-gradient cosine with
  ``ste`` 0.86 / 0.83 / 0.80 / 0.82 / 0.81 (``bpda``-``ste`` 0.90, ``ste``-``none`` 0.99).
* PGD-20 (linf, 200 samples, fine head) robust accuracy at 2/255: ``none`` 0.34, ``bpda`` 0.37, ``sharp`` 0.33 for
  every k within 0.015 (differences between k are noise); at 4/255 every routing gradient is at 0.01-0.05.

Argmax fidelity saturates early, so k is set by the rest: at k = 4 the logit error is a quarter of ``bpda``'s and
most gate values are near 0/1, while the samples near the threshold keep a routing gradient. A larger k drives the
surrogate towards the hard network, whose routing derivative is zero almost everywhere: the routing gradient
shrinks to a few samples with derivatives of order ``1/T`` (at k = 4 already 1.3x / 3x the ``none``
gradient norm, fine / coarse head).

Pitfall: with ``temperature=None`` the forward calibrates from each batch's own scores (a documented fallback),
so a sample's gradient depends on the other samples in its batch and changes between attack iterates.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
from torch.nn import functional as F

from models.gates import sharpening_temperature
from models.network import CoarseFineNet
from models.routing import routing_gradient
from robustness.core.errors import ConfigError
from robustness.core.vocab import HEADS


@contextmanager
def _evaluating(model: CoarseFineNet) -> Iterator[None]:
    """Eval mode for the duration: training mode would use training-time gate functions and update BatchNorm."""
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)


def _check(head: str, gate_grad: str) -> None:
    if head not in HEADS:
        raise ConfigError(f"unknown head {head!r}; choose one of: {', '.join(HEADS)}")
    routing_gradient(gate_grad)


@torch.no_grad()
def calibrate_temperature(model: CoarseFineNet, x: torch.Tensor) -> torch.Tensor:
    """Per-gate temperatures [n_gates] (path order) for routing gradient ``sharp`` from clean images ``x``.

    Uses the hard forward's scores (the deployed routing); ``[0]`` for a model without gates. Pass the result
    as ``model.gating(gate_grad="sharp", temperature=T)`` for every iterate of an attack.
    """
    if not model.is_gated:
        return torch.zeros(0, device=x.device)
    with _evaluating(model):
        scores = model(x, mode="hard", gate_grad="none").path_scores
    return sharpening_temperature(scores)


def surrogate_logits(model: CoarseFineNet, x: torch.Tensor, head: str, gate_grad: str,
                     temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Logits [B, classes] of the network the attacker differentiates under routing gradient ``gate_grad``.

    ``none``/``ste``: the hard network; ``bpda``: the soft network; ``sharp``: the sharpened soft network with
    ``temperature`` (calibrated on ``x`` when ``None``, like the forward's fallback); ``eot``: the EOT average
    (log mean probability over ``model.gate_state.eot_samples`` draws, so random). Gradients flow to ``x``.
    """
    _check(head, gate_grad)
    with _evaluating(model):
        if not model.is_gated:
            out = model(x, mode="hard", gate_grad="none")
        else:
            out = routing_gradient(gate_grad).surrogate(model, x, temperature)
    return out.logits(head)


@torch.no_grad()
def surrogate_fidelity(model: CoarseFineNet, x: torch.Tensor, head: str, gate_grad: str,
                       temperature: torch.Tensor | None = None) -> float:
    """Share of samples whose surrogate prediction (argmax) equals the hard (deployed) prediction.

    1.0 for ``none``/``ste`` and for a model without gates, whose surrogate is the hard network itself.
    """
    _check(head, gate_grad)
    with _evaluating(model):
        hard = model(x, mode="hard", gate_grad="none").logits(head).argmax(1)
    surrogate = surrogate_logits(model, x, head, gate_grad, temperature).argmax(1)
    return float((surrogate == hard).float().mean())


def input_gradient(model: CoarseFineNet, x: torch.Tensor, y: torch.Tensor, head: str, gate_grad: str,
                   temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Gradient [B, C, H, W] of the summed cross-entropy of ``head`` w.r.t. ``x`` under routing gradient
    ``gate_grad``.

    The forward is the hard one (what an attack runs); the summed loss makes each sample's gradient its own.
    """
    _check(head, gate_grad)
    xr = x.detach().clone().requires_grad_(True)
    with _evaluating(model):
        logits = model(xr, mode="hard", gate_grad=gate_grad, temperature=temperature).logits(head)
    loss = F.cross_entropy(logits.float(), y, reduction="sum")
    if not loss.requires_grad:
        return torch.zeros_like(xr)
    grad_x, = torch.autograd.grad(loss, xr, allow_unused=True)
    return torch.zeros_like(xr) if grad_x is None else grad_x


def gradient_cosine(model: CoarseFineNet, x: torch.Tensor, y: torch.Tensor, head: str, grad_a: str, grad_b: str,
                    temperature: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample cosine [B] between the input gradients under routing gradients ``grad_a`` and ``grad_b``.

    ``temperature`` is used by ``sharp``; a sample with a zero gradient under either gets cosine 0.
    """
    a = input_gradient(model, x, y, head, grad_a, temperature).flatten(1)
    b = input_gradient(model, x, y, head, grad_b, temperature).flatten(1)
    return F.cosine_similarity(a, b, dim=1)
