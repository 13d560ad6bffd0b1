"""What every model of the suite shares: [0,1] input with normalisation inside, one structured output, gate state.

Models take images in [0, 1] pixel space; the dataset's mean/std live inside the model as buffers, so attacks,
transfer and training all see the same function and nobody can forget to normalise.

A model has a ``fine`` head and, optionally, a ``coarse`` one: a single-head model (a plain classifier, a
researcher's gated ResNet) returns ``coarse=None`` and says ``has_coarse = False``; nothing invents a coarse label
for it. Every :class:`CoarseFineNet` also answers :meth:`CoarseFineNet.forward_gated`, so it satisfies the gated
model protocol of :mod:`models.protocol` (which adapts models that do not subclass this base).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from torch import nn

from models.cost import CostTable
from models.gates import GateState
from models.routing import routing_gradient
from robustness.core.errors import ConfigError

#: Normalisation of a model built without a dataset's mean/std (training always passes the dataset's own).
DEFAULT_MEAN = (0.5, 0.5, 0.5)
DEFAULT_STD = (0.25, 0.25, 0.25)


@dataclass
class ModelOutput:
    """One forward pass.

    ``fine`` / ``coarse``: logits [B, classes] (``coarse`` is None for a single-head model). ``gates``:
    executed-block bits per gated branch, float [B, n]. ``scores``: the gates' raw scores per branch [B, n]
    (``s > 0`` means run). ``values``: the gate multipliers actually used, carrying gradient where the mode gives
    one (training losses use these). ``macs``: [B].
    """

    fine: torch.Tensor
    coarse: torch.Tensor | None
    macs: torch.Tensor
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def logits(self, head: str) -> torch.Tensor:
        """Logits of the ``fine`` or ``coarse`` head; ConfigError for the coarse head of a single-head model."""
        if head == "fine":
            return self.fine
        if self.coarse is None:
            raise ConfigError(f"this model has no {head!r} head (a single-head model): attack target must be 'fine'")
        return self.coarse

    def _cat(self, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        if not parts:
            return self.fine.new_zeros(self.fine.shape[0], 0)
        return torch.cat(list(parts.values()), dim=1)

    @property
    def path(self) -> torch.Tensor:
        """Executed-block bits in path order (coarse-branch gates, then fine-branch gates), [B, n_gates]."""
        return self._cat(self.gates)

    @property
    def path_scores(self) -> torch.Tensor:
        """Gate scores in path order, [B, n_gates]."""
        return self._cat(self.scores)


@dataclass
class GatedOutput:
    """What the gated model protocol's ``forward_gated`` returns (:mod:`models.protocol`).

    ``logits`` [B, classes]; ``path``: executed-gate bits [B, n_gates] (1 = the block ran), in ``gate_names``
    order; ``macs`` [B] per-sample cost (None: the adapter counts it); ``scores`` [B, n_gates] the gates' raw
    scores with the ``s > 0`` rule (None: the path attacks have no routing signal); ``coarse``: a second head's
    logits (None for a single-head model).
    """

    logits: torch.Tensor
    path: torch.Tensor
    macs: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    coarse: torch.Tensor | None = None


#: The forward modes of the gated model protocol: the deployed deterministic forward, a differentiable
#: relaxation (the backward network of BPDA), one stochastic draw (for EOT), and a given path.
PROTOCOL_MODES = ("hard", "soft", "sample", "frozen")


class CoarseFineNet(nn.Module):
    """Base class: normalisation, gate state, cost table, ``gate_names``; subclasses implement ``_run``."""

    #: registry name, set by subclasses / the registry
    model_name: str = ""
    #: whether the model has a coarse head (False: single-head; its output's ``coarse`` is None)
    has_coarse: bool = True

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        #: the create_model options that rebuild this model (set by models.registry.create_model)
        self.config: dict = {}
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.gate_state = GateState()
        self.costs = CostTable(0.0, 0.0, ())

    # -- gates --------------------------------------------------------------------------------------------
    @property
    def gate_names(self) -> list[str]:
        """Name of each gated block in path order, e.g. ``coarse.s2.b1``; empty for static models."""
        return []

    @property
    def n_gates(self) -> int:
        return len(self.gate_names)

    @property
    def is_gated(self) -> bool:
        return self.n_gates > 0

    @property
    def heads(self) -> tuple[str, ...]:
        """The heads this model has: ``("fine", "coarse")`` or ``("fine",)``."""
        return ("fine", "coarse") if self.has_coarse else ("fine",)

    @contextmanager
    def gating(self, **changes) -> Iterator["CoarseFineNet"]:
        """Temporarily change the gate state, e.g. ``with model.gating(mode="soft"): ...``."""
        previous = self.gate_state
        self.gate_state = previous.updated(**changes)
        try:
            yield self
        finally:
            self.gate_state = previous

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *, mode: str | None = None, gate_grad: str | None = None,
                path: torch.Tensor | None = None, execution: str | None = None,
                temperature: torch.Tensor | None = None) -> ModelOutput:
        """Run on images ``x`` in [0, 1], [B, C, H, W]. Keyword arguments override the gate state for this call.

        A gated model's ``hard`` evaluation forward is its routing gradient's (:mod:`models.routing`): the values
        and the graph an attacker differentiates."""
        changes = {k: v for k, v in dict(mode=mode, gate_grad=gate_grad, path=path, execution=execution,
                                         temperature=temperature).items() if v is not None}
        state = self.gate_state.updated(**changes) if changes else self.gate_state
        if state.temperature is not None and self.is_gated and state.temperature.shape[0] != self.n_gates:
            raise ConfigError(f"gate temperature has {state.temperature.shape[0]} values, model has "
                              f"{self.n_gates} gates")
        if not self.is_gated or self.training or state.mode != "hard":
            return self._run(x, state)
        return routing_gradient(state.gate_grad).forward(self, x, state)

    def forward_gated(self, x: torch.Tensor, mode: str, path: torch.Tensor | None = None) -> GatedOutput:
        """The gated model protocol (:mod:`models.protocol`): one forward in a :data:`PROTOCOL_MODES` mode."""
        if mode not in PROTOCOL_MODES:
            raise ConfigError(f"unknown protocol mode {mode!r}; choose one of: {', '.join(PROTOCOL_MODES)}")
        out = self(x, mode=mode, gate_grad="none", path=path)
        return GatedOutput(logits=out.fine, path=out.path, macs=out.macs, scores=out.path_scores, coarse=out.coarse)

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        """One forward in ``state`` as it says (a ``hard`` state runs the deployed routing, with the routing
        gradient's decision hook); subclasses implement it."""
        raise NotImplementedError

    # -- measured quantities --------------------------------------------------------------------------------
    @property
    def full_macs(self) -> float:
        """Per-sample MACs with every block executed."""
        return self.costs.full

