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

Costs are measured, never declared: an adapted model counts its MACs with ``torch.utils.flop_counter`` on its
first forward (two samples of that input shape, never one: a model may ``squeeze()`` its batch away), so
``full_macs`` and ``costs`` are 0 before any forward. A score-gated model counts each gated block and its skip path
on their own; a :class:`GatedModel` is measured on its own ``frozen`` forward, one gate off at a time (its
declared ``macs``, if any, are only checked against that).

Pitfalls: a ``GatedModel`` has no temperature, so routing gradient ``sharp`` differentiates its ``soft`` network
(as ``bpda`` does), and ``ste`` is BPDA through ``soft`` too; a ``GatedModel`` without ``scores`` gets scores
``+-1`` from its bits, which carry no gradient, so the path and slowdown attacks find nothing to push on.
"""
from __future__ import annotations

import logging
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import nn

from models.cost import CostTable, count_macs
from models.gates import Decision, GateState, eval_decision, run_block
from models.network import PROTOCOL_MODES, CoarseFineNet, GatedOutput, ModelOutput
from models.routing import routing_gradient
from robustness.core.errors import ConfigError
from robustness.core.runtime import generator_kept

log = logging.getLogger(__name__)

__all__ = ["GatedModel", "GatedNet", "GatedOutput", "PROTOCOL_MODES", "ScoreGated", "ScoreGatedModel",
           "StaticNet", "adapt"]

#: ``gate(score, block, h) -> h'``: what :class:`ScoreGated` hands to ``forward_scored``.
GateCall = Callable[..., torch.Tensor]


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


#: What ``outputs`` may name an element of a tuple-returning model: its logits (the fine head) and a second head's.
#: Any other name (``"gates"``, ``"aux"``, ...) marks an element the suite does not read.
LOGIT_ROLES = ("logits", "coarse")

#: ``outputs``: the roles of a tuple output's elements (:data:`LOGIT_ROLES`), or a function of the output.
Outputs = Sequence[str] | Callable[[object], object] | None


def _check_outputs(outputs: Outputs, where: str) -> Outputs:
    if outputs is None or callable(outputs):
        return outputs
    if isinstance(outputs, str) or not all(isinstance(o, str) for o in outputs) or "logits" not in outputs \
            or any(outputs.count(role) > 1 for role in LOGIT_ROLES):
        raise ConfigError(f"{where}: outputs must name each element of the model's tuple output, once \"logits\" "
                          f"(and \"coarse\" for a second head), e.g. (\"logits\", \"gates\"), or be a function "
                          f"of the output; got {outputs!r}")
    return tuple(outputs)


def _logits_pair(out, where: str, outputs: Outputs = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(fine, coarse)`` from a wrapped module's return value: a logits tensor, or a tuple read by ``outputs``.

    A tuple is never guessed at: ``(logits, gates)`` and ``(fine, coarse)`` look alike, and reading one as the
    other attacks the wrong tensor."""
    if callable(outputs):
        out = outputs(out)
        if isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, torch.Tensor) for t in out):
            return out[0], out[1]
    if isinstance(out, torch.Tensor):
        return out, None
    if isinstance(out, (tuple, list)) and outputs is not None and not callable(outputs):
        if len(out) != len(outputs):
            raise ConfigError(f"{where} returned {len(out)} values, but outputs names {len(outputs)}: {outputs}")
        roles = dict(zip(outputs, out))
        if all(isinstance(roles.get(r), torch.Tensor) for r in outputs if r in LOGIT_ROLES):
            return roles["logits"], roles.get("coarse")
    if isinstance(out, (tuple, list)):
        raise ConfigError(f"{where} returned a tuple of {len(out)} values: say what each one is, e.g. "
                          f"adapt(model, outputs=(\"logits\", \"gates\")) or outputs=(\"logits\", \"coarse\") "
                          f"for two heads (a model file: set the module's outputs attribute), or a function "
                          f"returning the logits")
    raise ConfigError(f"{where} must return a logits tensor [B, classes], got {type(out).__name__}")


_ANNOUNCED: set[tuple[str, str]] = set()


def _announce(module: nn.Module, what: str) -> None:
    """Say once per model class and message what :func:`adapt` took the module to be (it decides from the
    members the module has: a wrong reading should be seen, not found in the numbers)."""
    key = (type(module).__qualname__, what)
    if key not in _ANNOUNCED:
        _ANNOUNCED.add(key)
        log.info("adapt: %s %s", type(module).__name__, what)


class _Adapted(CoarseFineNet):
    """What the adapters share: the wrapped module ``net``, normalisation, costs counted on the first forward."""

    has_coarse = False

    def __init__(self, net: nn.Module, name: str | None = None, mean=None, std=None, outputs: Outputs = None):
        super().__init__(*_normalisation(mean, std))
        self.net = net
        self.model_name = name or type(net).__name__
        self.outputs = _check_outputs(outputs, f"model {self.model_name!r}")
        self.train(net.training)
        self._measured: dict[tuple[int, ...], CostTable] = {}  # the cost table per input shape [C, H, W]
        #: forwards each prediction is the majority of: 1, or more for a model random at test time
        #: (:func:`models.fidelity.verify` sets it)
        self.draws = 1

    def _measure(self, x: torch.Tensor) -> CostTable:
        """The cost table of one sample shaped like ``x``: the full forward, then each gated block on its own."""
        raise NotImplementedError

    def _ensure_costs(self, x: torch.Tensor) -> None:
        """``costs`` for inputs shaped like ``x``, measured once per input shape (MACs depend on it)."""
        shape = tuple(x.shape[1:])
        if shape not in self._measured and x.shape[0] > 0:
            was = self.training
            self.eval()
            try:  # two samples, never one: a model may squeeze() its batch dimension away (SkipNet's gates do)
                sample = x[:2].detach() if x.shape[0] > 1 else x.detach().expand(2, *x.shape[1:])
                with generator_kept(x):  # a random model's draws here must not shift later ones
                    self._measured[shape] = self._measure(sample)
            finally:
                self.train(was)
        if shape in self._measured:
            self.costs = self._measured[shape]

    def forward(self, x: torch.Tensor, **kwargs) -> ModelOutput:
        self._ensure_costs(x)
        out = super().forward(x, **kwargs)
        self.has_coarse = out.coarse is not None
        return out

    def _run_once(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        raise NotImplementedError

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        if self.draws > 1 and not self.training:
            return self.vote([self._run_once(x, state) for _ in range(self.draws)])
        return self._run_once(x, state)

    @staticmethod
    def vote(outs: list[ModelOutput]) -> ModelOutput:
        """A random model's forwards as one (``models.fidelity``): per head, ``log((votes + p) / (k + 1))`` with
        ``votes`` the count of the ``k`` draws predicting each class and ``p`` their mean probability. Its argmax
        is the majority vote (ties go to the larger mean probability), it is a log-probability, and its gradient is
        that of the mean probability over the same draws: EOT over the model's own randomness. Path bits and
        scores are the first draw's, MACs the mean."""
        k = len(outs)

        def head(name: str) -> torch.Tensor | None:
            if name == "coarse" and outs[0].coarse is None:
                return None
            probs = torch.stack([o.logits(name) for o in outs]).float().softmax(-1)
            votes = nn.functional.one_hot(probs.argmax(-1), probs.shape[-1]).sum(0).to(probs)
            return torch.log((votes + probs.mean(0)) / (k + 1))

        first = outs[0]
        return ModelOutput(fine=head("fine"), coarse=head("coarse"), macs=torch.stack([o.macs for o in outs]).mean(0),
                           gates=first.gates, scores=first.scores, values=first.values)


class StaticNet(_Adapted):
    """A plain classifier (``x -> logits``) as a static single-head model (a ``(fine, coarse)`` pair: two heads)."""

    def _measure(self, x: torch.Tensor) -> CostTable:
        full = count_macs(lambda t: self.net(self.normalize(t)), x, per_sample=True)
        return CostTable(full=full, always_on=full, gated_blocks=())

    def _run_once(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        fine, coarse = _logits_pair(self.net(self.normalize(x)), f"model {self.model_name!r}", self.outputs)
        return ModelOutput(fine=fine, coarse=coarse, macs=self.costs.constant(x.shape[0], self.costs.full, x.device))


class _Router:
    """The ``gate`` callable of one :class:`ScoreGated` forward: decides each gate, runs its block, records it."""

    def __init__(self, owner: "ScoreGated", state: GateState, n_gates: int, recorder: list | None = None):
        self.owner, self.state, self.n_gates = owner, state, n_gates
        self.scores: list[torch.Tensor] = []
        self.decisions: list[Decision] = []
        self.recorder = recorder  # (block, input shape) of each gate while costs are measured

    def __call__(self, score: torch.Tensor, block: nn.Module, h: torch.Tensor,
                 skip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
        k, state = len(self.scores), self.state
        if k >= self.n_gates:
            raise ConfigError(f"model {self.owner.model_name!r} calls its gate more often than its "
                              f"{self.n_gates} gate_names")
        score = score.reshape(h.shape[0])
        if self.recorder is not None:
            self.recorder.append((block, skip, tuple(h.shape[1:])))
        d = eval_decision(score, state,
                          rate=self.owner.gate_rate[k] if state.mode == "random" else None,
                          frozen=state.path[:, k] if state.mode == "frozen" else None,
                          temperature=state.temperature[k] if state.mode == "sharpened" else None)
        self.scores.append(score)
        self.decisions.append(d)
        return run_block(block, h, d, skip=skip)

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

    def __init__(self, net: nn.Module, name: str | None = None, mean=None, std=None, outputs: Outputs = None):
        super().__init__(net, name, mean, std, outputs)
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
                                    f"{self.model_name}.forward_scored", self.outputs)
        return fine, coarse, router.finish()

    def _measure(self, x: torch.Tensor) -> CostTable:
        """The open forward once, then each gated block and its skip path on their own at the input shape the
        gate saw: a unit saves its block's MACs less its skip path's (:class:`models.cost.CostTable`)."""
        units: list[tuple[nn.Module, Callable | None, tuple[int, ...]]] = []
        full = count_macs(lambda t: self._forward(t, GateState(mode="open"), units), x, per_sample=True)
        saved = []
        for k, (block, skip, shape) in enumerate(units):
            h = x.new_zeros(x.shape[0], *shape)
            if skip is None:
                with torch.no_grad():
                    out = tuple(block(h).shape[1:])
                if out != shape:
                    raise ConfigError(f"model {self.model_name!r}: gated block {self.gate_names[k]} turns shape "
                                      f"{shape} into {out}, so skipping it cannot be the identity: pass its skip "
                                      f"path, gate(score, block, h, skip=shortcut)")
            saved.append(count_macs(block, h, per_sample=True) - (count_macs(skip, h, per_sample=True) if skip
                                                                  else 0.0))
        return CostTable(full=full, always_on=full - sum(saved), gated_blocks=tuple(saved))

    def _run_once(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        if self.training and state.mode == "hard" and state.gate_grad == "none":
            state = state.updated(gate_grad="ste")  # training through hard gates: the SkipNet straight-through
        fine, coarse, (bits, scores, values) = self._forward(x, state)
        macs = (self.costs.constant(x.shape[0], self.costs.full, x.device) if state.mode == "open"
                else self.costs.per_sample(bits))
        return ModelOutput(fine=fine, coarse=coarse, macs=macs, gates={"path": bits}, scores={"path": scores},
                           values={"path": values})


class GatedNet(_AdaptedGated):
    """A :class:`GatedModel` as a full gated model of the suite (see the module docstring for what it maps).

    Per-sample MACs are the suite's measurement (:meth:`_measure`), never the model's declaration: a declared
    ``macs`` is checked against it once and a disagreement is logged."""

    _declared_checked = False

    def _check_declared(self, declared: torch.Tensor, measured: torch.Tensor) -> None:
        self._declared_checked = True
        gap = (declared.to(measured) - measured).abs().max()
        if float(gap) > 0.01 * max(self.costs.full, 1.0):
            log.warning("model %r declares per-sample MACs up to %.4g away from the suite's measurement of its "
                        "path (full %.4g): the measurement is used", self.model_name, float(gap), self.costs.full)

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
        """Measured on the model's own ``frozen`` forward: every gate on, then each gate alone off (what that gate
        saves), then every gate off (is the cost additive?). A model that computes skipped blocks and masks them
        saves nothing as measured, and says so once: the suite reports compute its forward really spends."""
        def cost(path: torch.Tensor) -> float:
            return count_macs(lambda t: self._call(t, "frozen", path), x, per_sample=True)

        on = x.new_ones(x.shape[0], self.n_gates)
        full = cost(on)
        saved = []
        for k in range(self.n_gates):
            off = on.clone()
            off[:, k] = 0
            saved.append(full - cost(off))
        table = CostTable(full=full, always_on=full - sum(saved), gated_blocks=tuple(saved))
        none = cost(torch.zeros_like(on))
        if full > 0 and not any(saved):
            log.warning("model %r: its frozen forward costs %.4g MACs whatever the path: skipped gates are "
                        "computed (and masked), so compute saved is measured as 0; run a skipped block on none of "
                        "the samples to save it", self.model_name, full)
        elif full > 0 and abs(none - table.always_on) > 0.01 * full:
            log.warning("model %r: its gates' savings do not add up (every gate off costs %.4g MACs, the sum over "
                        "single gates predicts %.4g): per-sample MACs are approximate", self.model_name, none,
                        table.always_on)
        return table

    def _run_once(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        instead = routing_gradient(state.gate_grad).without_scores
        if state.mode == "hard" and instead is not None and not self.training:
            # e.g. ste: a model without gate scores has no score to pass a gradient straight through
            return routing_gradient(instead).forward(self, x, state.updated(gate_grad=instead))
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
        macs = self.costs.per_sample(bits)
        if out.macs is not None and not self._declared_checked:
            self._check_declared(out.macs.detach(), macs)
        return ModelOutput(fine=out.logits, coarse=out.coarse, macs=macs, gates={"path": bits},
                           scores={"path": scores}, values={"path": bits})


def adapt(module: nn.Module, *, name: str | None = None, mean=None, std=None,
          outputs: Outputs = None) -> CoarseFineNet:
    """``module`` as a model of the suite (takes [0, 1] images; ``mean``/``std`` normalise before ``module``).

    A :class:`CoarseFineNet` comes back as is; a :class:`ScoreGatedModel` is wrapped in :class:`ScoreGated`, a
    :class:`GatedModel` in :class:`GatedNet`, a module without ``gate_names`` (``x -> logits``) in
    :class:`StaticNet`; what was chosen is logged once per class. A module that declares ``gate_names`` without
    ``forward_scored`` or ``forward_gated`` is a ConfigError: it says it is gated, and a static reading would
    report its gates as never skipping. ``outputs`` reads a tuple output (:func:`_logits_pair`): the role of
    each element (``("logits", "gates")``, ``("logits", "coarse")``) or a function of the output; without it the
    module's own ``outputs`` attribute, else a tuple output is an error. ``name`` is the model name the records
    carry (default: the class name). Example::

        >>> net = adapt(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 10)))
        >>> net(torch.rand(2, 3, 8, 8)).fine.shape
        torch.Size([2, 10])
    """
    if isinstance(module, CoarseFineNet):
        return module
    if not isinstance(module, nn.Module):
        raise ConfigError(f"adapt needs a torch.nn.Module, got {type(module).__name__}")
    declared = getattr(module, "outputs", None)
    if outputs is None and isinstance(declared, (tuple, list)) and all(isinstance(o, str) for o in declared):
        outputs = declared  # the module's own declaration (a model file's way to say it); never a method
    if isinstance(module, ScoreGatedModel):
        _announce(module, "has gate_names and forward_scored: a score-gated model (a gate runs its block when its "
                          "score > 0)")
        return ScoreGated(module, name, mean, std, outputs)
    if isinstance(module, GatedModel):
        _announce(module, "has gate_names and forward_gated: a gated model of the general protocol")
        return GatedNet(module, name, mean, std, outputs)
    if hasattr(module, "gate_names"):
        raise ConfigError(f"model {name or type(module).__name__!r} declares gate_names but defines neither "
                          f"forward_scored(x, gate) nor forward_gated(x, mode, path): add one (models/protocol.py), "
                          f"or drop gate_names to evaluate it as a static model")
    _announce(module, "has no gate_names: a static model (every layer runs for every input)")
    return StaticNet(module, name, mean, std, outputs)
