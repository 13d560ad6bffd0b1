"""Any classifier or dynamic network as a suite model: the gated model protocol, its adapters, and :func:`adapt`.

The attacks, checks and analyses of the suite talk to a :class:`models.network.CoarseFineNet` (gate modes,
routing gradients, costs). A researcher's network need not subclass it; it only has to satisfy one of two small
protocols, and :func:`adapt` supplies the rest (normalisation, the BPDA / sharpened / EOT compositions of
``models.network``, per-sample MACs, the ``open`` and ``random`` controls):

* :class:`GatedModel`, the general protocol: ``gate_names`` (one name per gate, in path order) and
  ``forward_gated(x, mode, path=None) -> GatedOutput`` (logits, executed-path bits, optionally per-sample MACs
  and gate scores) in the four :data:`models.network.PROTOCOL_MODES`: ``hard`` (the deployed forward),
  ``soft`` (a differentiable relaxation: BPDA's backward network), ``sample`` (one stochastic draw: EOT) and
  ``frozen`` (run the given path). :class:`GatedNet` adapts it. The repo's DSN satisfies it (every
  ``CoarseFineNet`` does).
* :class:`ScoreGatedModel`, the common gate style (SkipNet, ConvNet-AIG): a block-level gate whose score
  ``s > 0`` means "run the block". The model writes ``gate_names`` and ``forward_scored(x, gate)``, calling
  ``h = gate(score, block, h)`` at each gated block; :class:`ScoreGated` decides per gate mode and routing gradient
  (hard with real sub-batch skipping, open, soft ``sigmoid(s)``, sharpened ``sigmoid(s / T)``, sampled, random,
  frozen, straight-through) and records path bits, scores and MACs itself. This is the least a researcher writes::

      class AIGNet(nn.Module):
          gate_names = ["s1.b1", "s1.b2"]

          def forward_scored(self, x, gate):
              h = self.stem(x)
              for block, scorer in zip(self.blocks, self.scorers):
                  h = gate(scorer(h), block, h)      # scorer(h): [B] scores; block(h) has h's shape
              return self.head(h.mean((2, 3)))

* anything else (``x in [0, 1] -> logits``, e.g. a torchvision ResNet) becomes a static single-head model
  (:class:`StaticNet`).

Inputs are images in [0, 1]; ``mean`` / ``std`` given to :func:`adapt` are applied before the wrapped module (by
default none: the module normalises itself, as torchvision-style models that expect [0, 1] inputs do).

Costs: an adapted model counts its MACs with ``torch.utils.flop_counter`` on its first forward (one sample of that
input shape; every gated block once on its own), so ``full_macs`` and ``costs`` are 0 before any forward.

Pitfalls: a ``GatedModel`` has no temperature, so routing gradient ``sharp`` differentiates its ``soft`` network
(as ``bpda`` does), and ``ste`` is BPDA through ``soft`` too; a ``GatedModel`` without ``scores`` gets scores
``+-1`` from its bits, which carry no gradient, so the path and slowdown attacks find nothing to push on.
"""
from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from models.cost import CostTable, count_macs
from models.gates import Decision, GateState, eval_decision, run_block
from models.network import PROTOCOL_MODES, CoarseFineNet, GatedOutput, ModelOutput
from robustness.core.errors import ConfigError

__all__ = ["GatedModel", "GatedNet", "GatedOutput", "PROTOCOL_MODES", "ScoreGated", "ScoreGatedModel",
           "StaticNet", "adapt"]

#: ``gate(score, block, h) -> h'``: what :class:`ScoreGated` hands to ``forward_scored``.
GateCall = Callable[[torch.Tensor, nn.Module, torch.Tensor], torch.Tensor]


@runtime_checkable
class GatedModel(Protocol):
    """The gated model protocol: gate names and one forward per :data:`PROTOCOL_MODES` mode (module docstring)."""

    gate_names: Sequence[str]

    def forward_gated(self, x: torch.Tensor, mode: str, path: torch.Tensor | None = None) -> GatedOutput:
        """Logits and executed-path bits of ``x`` ([0, 1] images, after :func:`adapt`'s normalisation)."""
        ...


@runtime_checkable
class ScoreGatedModel(Protocol):
    """The common gate style: ``forward_scored(x, gate)`` calls ``gate(score, block, h)`` at each gated block."""

    gate_names: Sequence[str]

    def forward_scored(self, x: torch.Tensor, gate: GateCall) -> torch.Tensor:
        """Logits of ``x`` (or ``(fine, coarse)`` logits for a two-head model)."""
        ...


def _normalisation(mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if (mean is None) != (std is None):
        raise ConfigError("adapt: give both mean and std, or neither")
    if mean is None:
        return (0.0,), (1.0,)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if len(mean) != len(std) or not mean or any(s <= 0 for s in std):
        raise ConfigError(f"adapt: mean and std need one value per channel and std > 0, got {mean} and {std}")
    return mean, std


def _logits_pair(out, where: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fine, coarse)`` from a wrapped module's return value: a logits tensor, or a pair of them."""
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
        return out[0], out[1]
    raise ConfigError(f"{where} must return a logits tensor [B, classes] (or a (fine, coarse) pair), got "
                      f"{type(out).__name__}")


class _Adapted(CoarseFineNet):
    """What the adapters share: the wrapped module ``net``, normalisation, costs counted on the first forward."""

    has_coarse = False

    def __init__(self, net: nn.Module, name: str | None = None, mean=None, std=None):
        super().__init__(*_normalisation(mean, std))
        self.net = net
        self.model_name = name or type(net).__name__
        self.train(net.training)
        self._measured = False

    def _measure(self, x: torch.Tensor) -> CostTable:
        """The cost table of one sample shaped like ``x``: the full forward, then each gated block on its own."""
        raise NotImplementedError

    def _ensure_costs(self, x: torch.Tensor) -> None:
        if not self._measured and x.shape[0] > 0:
            was = self.training
            self.eval()
            try:
                self.costs = self._measure(x[:1].detach())
            finally:
                self.train(was)
            self._measured = True

    def forward(self, x: torch.Tensor, **kwargs) -> ModelOutput:
        self._ensure_costs(x)
        out = super().forward(x, **kwargs)
        self.has_coarse = out.coarse is not None
        return out


class StaticNet(_Adapted):
    """A plain classifier (``x -> logits``) as a static single-head model (a ``(fine, coarse)`` pair: two heads)."""

    def _measure(self, x: torch.Tensor) -> CostTable:
        full = count_macs(lambda t: self.net(self.normalize(t)), x)
        return CostTable(full=full, always_on=full, gated_blocks=())

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        fine, coarse = _logits_pair(self.net(self.normalize(x)), f"model {self.model_name!r}")
        return ModelOutput(fine=fine, coarse=coarse, macs=self.costs.constant(x.shape[0], self.costs.full, x.device))


class _Router:
    """The ``gate`` callable of one :class:`ScoreGated` forward: decides each gate, runs its block, records it."""

    def __init__(self, owner: "ScoreGated", state: GateState, n_gates: int, recorder: list | None = None):
        self.owner, self.state, self.n_gates = owner, state, n_gates
        self.scores: list[torch.Tensor] = []
        self.decisions: list[Decision] = []
        self.recorder = recorder  # (block, input shape) of each gate while costs are measured

    def __call__(self, score: torch.Tensor, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        k, state = len(self.scores), self.state
        if k >= self.n_gates:
            raise ConfigError(f"model {self.owner.model_name!r} calls its gate more often than its "
                              f"{self.n_gates} gate_names")
        score = score.reshape(h.shape[0])
        if self.recorder is not None:
            self.recorder.append((block, tuple(h.shape[1:])))
        d = eval_decision(score, state,
                          rate=self.owner.gate_rate[k] if state.mode == "random" else None,
                          frozen=state.path[:, k] if state.mode == "frozen" else None,
                          temperature=state.temperature[k] if state.mode == "sharpened" else None)
        self.scores.append(score)
        self.decisions.append(d)
        return run_block(block, h, d)

    def finish(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Executed bits, scores and gate values [B, n_gates]; ConfigError when not every gate was called."""
        if len(self.scores) != self.n_gates:
            raise ConfigError(f"model {self.owner.model_name!r} called its gate {len(self.scores)} times, but "
                              f"declares {self.n_gates} gate_names")
        bits = torch.stack([d.executed for d in self.decisions], 1).float()
        return bits, torch.stack(self.scores, 1), torch.stack([d.value for d in self.decisions], 1)


class _AdaptedGated(_Adapted):
    """What the gated adapters share: the module's ``gate_names`` (checked once) and ``gate_rate``, a buffer (ones
    until set) holding each gate's execution rate for the ``random`` control."""

    def __init__(self, net: nn.Module, name: str | None = None, mean=None, std=None):
        super().__init__(net, name, mean, std)
        names = [str(n) for n in net.gate_names]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"model {self.model_name!r}: gate_names must be unique and non-empty, got {names}")
        self._gate_names = names
        self.register_buffer("gate_rate", torch.ones(len(names)))

    @property
    def gate_names(self) -> list[str]:
        return list(self._gate_names)


class ScoreGated(_AdaptedGated):
    """A :class:`ScoreGatedModel` (block gates with the ``s > 0`` rule) as a full gated model of the suite."""

    def _forward(self, x: torch.Tensor, state: GateState, recorder: list | None = None):
        if state.mode == "frozen" and state.path.shape[1] != self.n_gates:
            raise ConfigError(f"frozen path has {state.path.shape[1]} bits, model has {self.n_gates} gates")
        router = _Router(self, state, self.n_gates, recorder)
        fine, coarse = _logits_pair(self.net.forward_scored(self.normalize(x), router),
                                    f"{self.model_name}.forward_scored")
        return fine, coarse, router.finish()

    def _measure(self, x: torch.Tensor) -> CostTable:
        blocks: list[tuple[nn.Module, tuple[int, ...]]] = []
        full = count_macs(lambda t: self._forward(t, GateState(mode="open"), blocks), x)
        each = tuple(count_macs(block, x.new_zeros(1, *shape)) for block, shape in blocks)
        return CostTable(full=full, always_on=full - sum(each), gated_blocks=each)

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        if self.training and state.mode == "hard" and state.grad == "none":
            state = state.updated(grad="ste")  # training through hard gates: the SkipNet straight-through
        fine, coarse, (bits, scores, values) = self._forward(x, state)
        macs = (self.costs.constant(x.shape[0], self.costs.full, x.device) if state.mode == "open"
                else self.costs.per_sample(bits))
        return ModelOutput(fine=fine, coarse=coarse, macs=macs, gates={"path": bits}, scores={"path": scores},
                           values={"path": values})


class GatedNet(_AdaptedGated):
    """A :class:`GatedModel` as a full gated model of the suite (see the module docstring for what it maps)."""

    def _call(self, x: torch.Tensor, mode: str, path: torch.Tensor | None = None) -> GatedOutput:
        out = self.net.forward_gated(self.normalize(x), mode, path)
        if isinstance(out, (tuple, list)):
            out = GatedOutput(*out)
        if not isinstance(out, GatedOutput):
            raise ConfigError(f"{self.model_name}.forward_gated must return a GatedOutput or (logits, path[, macs]), "
                              f"got {type(out).__name__}")
        if out.path.shape != (x.shape[0], self.n_gates):
            raise ConfigError(f"{self.model_name}.forward_gated returned a path of shape {tuple(out.path.shape)}, "
                              f"expected [{x.shape[0]}, {self.n_gates}] (one bit per gate name)")
        return out

    def _measure(self, x: torch.Tensor) -> CostTable:
        full = count_macs(lambda t: self._call(t, "frozen", t.new_ones(t.shape[0], self.n_gates)), x)
        return CostTable(full=full, always_on=full, gated_blocks=())

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        if state.mode == "hard" and state.grad == "ste" and not self.training:
            return self._bpda(x, state.updated(grad="bpda"))  # no straight-through without a score: BPDA
        mode, path = state.mode, state.path
        if mode == "open":
            mode, path = "frozen", x.new_ones(x.shape[0], self.n_gates)
        elif mode == "random":
            mode, path = "frozen", torch.bernoulli(self.gate_rate.to(x).expand(x.shape[0], -1))
        elif mode == "sharpened":
            mode = "soft"
        if path is not None:
            path = path.to(x.device, torch.float32)
        out = self._call(x, mode, path)
        bits = out.path.detach().float()
        scores = out.scores if out.scores is not None else bits * 2 - 1
        macs = out.macs.detach().to(torch.float64) if out.macs is not None else self.costs.constant(
            x.shape[0], self.costs.full, x.device)
        return ModelOutput(fine=out.logits, coarse=out.coarse, macs=macs, gates={"path": bits},
                           scores={"path": scores}, values={"path": bits})


def adapt(module: nn.Module, *, name: str | None = None, mean=None, std=None) -> CoarseFineNet:
    """``module`` as a model of the suite (takes [0, 1] images; ``mean``/``std`` normalise before ``module``).

    A :class:`CoarseFineNet` comes back as is; a :class:`ScoreGatedModel` is wrapped in :class:`ScoreGated`, a
    :class:`GatedModel` in :class:`GatedNet`, anything else (``x -> logits``) in :class:`StaticNet`. ``name`` is
    the model name the records carry (default: the class name). Example::

        >>> net = adapt(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)))
        >>> net(torch.rand(2, 3, 8, 8)).fine.shape
        torch.Size([2, 10])
    """
    if isinstance(module, CoarseFineNet):
        return module
    if not isinstance(module, nn.Module):
        raise ConfigError(f"adapt needs a torch.nn.Module, got {type(module).__name__}")
    if isinstance(module, ScoreGatedModel):
        return ScoreGated(module, name, mean, std)
    if isinstance(module, GatedModel):
        return GatedNet(module, name, mean, std)
    return StaticNet(module, name, mean, std)
