"""Routing gradient ``none``: the naive evaluation; the deployed hard forward, no gradient through the routing."""
from __future__ import annotations

from typing import Any

from models.routing import RoutingGradient, register_routing_gradient


@register_routing_gradient
class NoRoutingGradient(RoutingGradient):
    """The hard gates as deployed: a skipped block passes nothing back, a gate's decision has no derivative."""

    name = "none"
    summary = "no gradient through the routing (the naive evaluation)"
    exact_on_hard = True
    adaptive = False

    def surrogate(self, net: Any, x: Any, temperature: Any = None) -> Any:
        return net(x, mode="hard", gate_grad="none")
