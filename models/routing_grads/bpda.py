"""Routing gradient ``bpda``: the hard network's values, the soft network's gradient (every gated block mixed by
``sigmoid(s)``; Athalye et al. 2018, BPDA)."""
from __future__ import annotations

from typing import Any

import torch

from models.routing import RoutingGradient, hard_values, register_routing_gradient


@register_routing_gradient
class BPDA(RoutingGradient):
    """Backward pass through the soft network; forward values of the deployed one, bit for bit."""

    name = "bpda"
    summary = "hard forward, backward through the soft network sigmoid(s)"
    exact_on_hard = True

    def forward(self, net: Any, x: torch.Tensor, state: Any) -> Any:
        with torch.no_grad():
            hard = net._run(x, state.updated(gate_grad="none"))
        return hard_values(hard, net._run(x, state.updated(mode="soft", gate_grad="none")))

    def surrogate(self, net: Any, x: torch.Tensor, temperature: Any = None) -> Any:
        return net(x, mode="soft", gate_grad="none")
