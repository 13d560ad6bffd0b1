"""Routing gradient ``sharp``: BPDA whose backward network mixes each gated block by ``sigmoid(s / T)``, ``T`` a
per-gate temperature (models/gates.py, ``sharpening_temperature``; the choice of its sharpness is measured in
models/surrogates.py). The runner calibrates ``T`` once on clean inputs and passes it (``needs_temperature``);
without one the forward calibrates from each batch's own clean scores, a fallback whose surrogate changes with
the batch."""
from __future__ import annotations

from typing import Any

import torch

from models.gates import sharpening_temperature
from models.routing import RoutingGradient, hard_values, register_routing_gradient


@register_routing_gradient
class SharpenedBPDA(RoutingGradient):
    """Values of the deployed network, gradient of the sharpened soft network."""

    name = "sharp"
    summary = "BPDA through sigmoid(s / T), T a per-gate temperature calibrated on clean inputs"
    exact_on_hard = True
    needs_temperature = True

    def forward(self, net: Any, x: torch.Tensor, state: Any) -> Any:
        with torch.no_grad():
            hard = net._run(x, state.updated(gate_grad="none"))
        temperature = state.temperature if state.temperature is not None else sharpening_temperature(
            hard.path_scores)
        return hard_values(hard, net._run(x, state.updated(mode="sharpened", gate_grad="none",
                                                           temperature=temperature)))

    def surrogate(self, net: Any, x: torch.Tensor, temperature: Any = None) -> Any:
        if temperature is None:
            with torch.no_grad():
                temperature = sharpening_temperature(net(x, mode="hard", gate_grad="none").path_scores)
        return net(x, mode="sharpened", gate_grad="none", temperature=temperature)
