"""Routing gradient ``ste``: straight-through; hard decisions forward, the derivative of ``sigmoid(s)`` backward.

Every gated block is then executed by masking (``x + v * (f(x) - x)``, so that ``v`` carries the gradient), which
is not the deployed sub-batch forward bit for bit: not ``exact_on_hard``. A gated model without gate scores has
nothing to pass straight through and runs ``bpda`` instead.
"""
from __future__ import annotations

from typing import Any

import torch

from models.gates import Decision, straight_through
from models.routing import RoutingGradient, register_routing_gradient


@register_routing_gradient
class StraightThrough(RoutingGradient):
    """SkipNet's straight-through estimator, as the attacker's routing gradient."""

    name = "ste"
    summary = "straight-through: hard forward, sigmoid derivative backward"
    without_scores = "bpda"

    def hard_decision(self, score: torch.Tensor, executed: torch.Tensor, hard: torch.Tensor) -> Decision:
        return Decision(executed=executed, value=straight_through(hard, torch.sigmoid(score)), mask=True)

    def surrogate(self, net: Any, x: torch.Tensor, temperature: Any = None) -> Any:
        """The hard network itself (the masked forward differs from it by float rounding only)."""
        return net(x, mode="hard", gate_grad="none")
