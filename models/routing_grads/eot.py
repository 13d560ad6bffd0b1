"""Routing gradient ``eot``: the expectation over Bernoulli(sigmoid(s)) gate draws (log of the mean predicted
probabilities over ``GateState.eot_samples`` draws, each with a straight-through gradient). Random, and not the
deployed forward: not ``exact_on_hard``."""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from models.routing import RoutingGradient, register_routing_gradient


@register_routing_gradient
class ExpectationOverTransformation(RoutingGradient):
    """EOT over the gates' own randomness; MACs and executed bits are the deployed forward's."""

    name = "eot"
    summary = "expectation over Bernoulli(sigmoid(s)) gate draws"

    def forward(self, net: Any, x: torch.Tensor, state: Any) -> Any:
        outs = [net._run(x, state.updated(mode="sample", gate_grad="none")) for _ in range(state.eot_samples)]

        def mean_log_prob(head: str) -> torch.Tensor | None:
            if head == "coarse" and outs[0].coarse is None:
                return None
            logp = torch.stack([o.logits(head).log_softmax(1) for o in outs])
            return torch.logsumexp(logp, dim=0) - torch.log(torch.tensor(float(len(outs))))

        with torch.no_grad():
            hard = net._run(x, state.updated(gate_grad="none"))
        return dataclasses.replace(hard, fine=mean_log_prob("fine"), coarse=mean_log_prob("coarse"),
                                   scores=outs[0].scores, values=outs[0].values)
