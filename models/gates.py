"""Gate modules and gate functions: how a score becomes a decision to run or skip a block.

Vocabulary (see DESIGN.md, "Gate modes"):

* gate function (how the model was *trained*): ``hardsig`` (CVPR'18 DSN: ``clamp(k*s + 0.5, 0, 1)`` with the
  slope ``k`` annealed up), ``ste`` (SkipNet: hard threshold forward, sigmoid backward), ``gumbel`` (ConvNet-AIG:
  straight-through Gumbel-sigmoid). Gate functions live in a registry: one function decorated with
  ``@register_gate_function("name")`` is a new one, usable as the model option ``gate_fn`` and ``--gate-fn``.
* forward mode (how the model *runs* at evaluation): ``hard`` (``1[s > 0]``, skipped blocks are not computed),
  ``open`` (every block runs), ``soft`` (``sigmoid(s)`` mixes every block), ``random`` (Bernoulli at the measured
  per-block execution rates), ``frozen`` (a given path).
* routing gradient (``gate_grad``, what an *attacker* sees through the hard gates): ``none`` (no gradient through
  routing), ``ste`` (straight-through: hard forward, ``sigmoid`` derivative backward), ``bpda`` (forward of the hard
  network, backward through the soft network), ``eot`` (expectation over Bernoulli(sigmoid(s)) gate samples),
  ``sharp`` (BPDA whose backward network mixes each gated block by ``sigmoid(s / T)``, ``T`` a per-gate
  temperature). Routing gradients live in a registry (:mod:`models.routing`); a hard gate's decision asks the
  state's one for its hook (:meth:`models.routing.RoutingGradient.hard_decision`).

The relaxation an attacker differentiates is ``sigmoid(s)`` (``sharp``: ``sigmoid(s / T)``): it is smooth
everywhere, unlike the annealed hard sigmoid whose derivative vanishes for most scores once the slope is large.

Pitfall behind ``sharp``: a trained model's scores may sit right on the threshold (the STE-trained quickstart dsn
has median ``|s|`` of about 0.004), so ``sigmoid(s)`` runs nearly every gated block at half strength and the soft
network BPDA differentiates is far from the hard one. Dividing by a temperature of the scores' own scale
(:func:`sharpening_temperature`) puts most surrogate values near 0 or 1 again. The temperature is calibrated once
on clean inputs and then held fixed (``GateState.temperature``): a surrogate that changes with the batch or with
each attack iterate is not one fixed function, and its gradients are not those of any network.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, TypeVar

import torch
from torch import nn

from models.folding import ParameterConstant, batchnorm_sources, differentiable_or_cached, fold_batchnorm, \
    in_training
from models.routing import routing_gradient
from robustness.core.errors import ConfigError, UnknownNameError
from robustness.core.norms import per_sample
from robustness.core.vocab import EXECUTIONS, FORWARD_MODES


#: Forward modes used inside the model only (routing gradients ``eot`` and ``sharp``); not for users.
INTERNAL_MODES = ("sample", "sharpened")
#: ``k`` of :func:`sharpening_temperature`: a gate whose score is the gate's median ``|s|`` gets value
#: ``sigmoid(+-k)``, i.e. 0.982 / 0.018 for k = 4; half of the samples are further from 0.5 than that.
SHARPNESS = 4.0
#: Smallest temperature: keeps ``s / T`` finite for a gate whose scores are all (near) zero.
MIN_TEMPERATURE = 1e-6


def sharpening_temperature(scores: torch.Tensor, sharpness: float = SHARPNESS,
                           floor: float = MIN_TEMPERATURE) -> torch.Tensor:
    """Per-gate temperature ``T_l = max(median_b |s_l,b| / sharpness, floor)`` from clean scores [B, n_gates].

    Scale-free: multiplying a gate's scores by ``c > 0`` (which leaves its hard decisions unchanged) multiplies
    its temperature by ``c``, so the sharpened surrogate ``sigmoid(s / T)`` does not change either. The choice of
    ``SHARPNESS`` is justified with measurements in models/surrogates.py. Returns a detached float tensor [n_gates].
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ConfigError(f"gate temperature needs scores [B > 0, n_gates], got shape {tuple(scores.shape)}")
    if sharpness <= 0:
        raise ConfigError(f"sharpness must be positive, got {sharpness}")
    median = scores.detach().float().abs().median(dim=0).values
    return (median / sharpness).clamp_min(floor)


@dataclass(frozen=True)
class GateState:
    """How gates behave in a forward pass.

    ``mode``: the forward mode; ``gate_grad``: the routing gradient of a ``hard`` evaluation forward (a name
    registered in :mod:`models.routing`; the same word as ``--gate-grad`` and the records' ``gate_grad``).
    ``path`` (frozen mode) holds bits [B, n_gates] in path order (coarse-branch gates, then fine-branch gates).
    ``execution`` chooses how hard decisions are carried out: ``subbatch`` computes a block only for the samples
    that run it; ``mask`` computes it for all and multiplies (same outputs, no saving; a benchmark baseline).
    ``sample`` is an internal mode: one Bernoulli(sigmoid(s)) draw with a straight-through gradient (EOT).
    ``sharpened`` is an internal mode: the soft network with gate values ``sigmoid(s / temperature)`` (the
    backward network of routing gradient ``sharp``); it needs ``temperature``.
    ``temperature``: positive per-gate temperatures [n_gates] in path order for routing gradient ``sharp``
    (see :func:`sharpening_temperature`); ``None`` calibrates one from each batch's own clean scores.
    """

    mode: str = "hard"
    gate_grad: str = "none"
    path: torch.Tensor | None = None
    eot_samples: int = 8
    execution: str = "subbatch"
    temperature: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.mode not in FORWARD_MODES + INTERNAL_MODES:
            raise ConfigError(f"unknown gate mode {self.mode!r}; choose one of: {', '.join(FORWARD_MODES)}")
        routing_gradient(self.gate_grad)  # UnknownNameError for a name no module registered
        if self.execution not in EXECUTIONS:
            raise ConfigError(f"unknown execution {self.execution!r}; choose one of: {', '.join(EXECUTIONS)}")
        if self.mode == "frozen" and self.path is None:
            raise ConfigError("gate mode 'frozen' needs a path (bits [B, n_gates])")
        if self.eot_samples < 1:
            raise ConfigError("eot_samples must be >= 1")
        if self.temperature is not None and self.temperature.dim() != 1:
            raise ConfigError(f"gate temperature must be one value per gate [n_gates], got shape "
                              f"{tuple(self.temperature.shape)}")
        if self.mode == "sharpened" and self.temperature is None:
            raise ConfigError("gate mode 'sharpened' needs a temperature (one value per gate)")

    def updated(self, **changes) -> "GateState":
        return replace(self, **changes)


class Gate(nn.Module):
    """Reads a block's input and scores whether to run it: GAP -> Linear(C, h) -> BN -> ReLU -> Linear(h, 1).

    The last bias starts at ``open_bias`` > 0 so that every gate starts open (ConvNet-AIG initialises ~85% open).
    The default 0.4 keeps the hard sigmoid off its flat top at slope 1 (0.4 + 0.5 = 0.9), so that the budget loss
    has a gradient from the first step; a larger bias saturates it and the gates never learn to close.
    Returns the score ``s`` of shape [B]; the block runs when ``s > 0``.

    An evaluation forward runs the head as sum -> addmm -> ReLU -> addmm, with the spatial mean and BatchNorm folded
    into the first weight (:mod:`models.folding`; cached while the weights are frozen): fewer kernels and
    dispatches, the same scores up to rounding.
    """

    def __init__(self, channels: int, hidden: int = 16, open_bias: float = 0.4):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 1)
        nn.init.normal_(self.fc2.weight, std=0.01)
        nn.init.constant_(self.fc2.bias, open_bias)
        self._folded = ParameterConstant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.column(x).squeeze(1)

    def column(self, x: torch.Tensor) -> torch.Tensor:
        """The scores as a column [B, 1]: a network that only collects them concatenates columns, no squeeze."""
        if in_training(self):
            return self.fc2(torch.relu(self.bn(self.fc1(x.mean(dim=(2, 3))))))
        area = x.shape[2] * x.shape[3]
        w1t, b1, w2t, b2 = differentiable_or_cached(
            self, self._folded, (self.fc1.weight, *batchnorm_sources(self.bn), self.fc2.weight, self.fc2.bias),
            lambda: self._fold(area), extra=(area,))
        return torch.addmm(b2, torch.relu(torch.addmm(b1, x.sum(dim=(2, 3)), w1t)), w2t)

    def train(self, mode: bool = True) -> "Gate":
        self._folded.clear()  # see models/folding.py: edits through .data bump no version
        return super().train(mode)

    def _fold(self, area: int) -> tuple[torch.Tensor, ...]:
        """fc1 with the spatial mean (1 / area) and BatchNorm folded in, and fc2, as transposed weights."""
        weight, bias = fold_batchnorm(self.fc1.weight / area, self.bn)
        return weight.t(), bias, self.fc2.weight.t(), self.fc2.bias


@dataclass
class Decision:
    """One gate's decision for a batch.

    ``executed``: bool [B], which samples run the block. ``value``: float [B], the multiplier used when the block
    is executed by masking (carries the gradient, if any). ``mask``: whether the block must be computed for every
    sample (soft values or a routing gradient need it); otherwise it runs on the executed sub-batch only.
    ``uniform``: what is known *without reading the device tensors*: True when every sample runs the block (open
    mode, or a frozen path whose column is all ones), False when none does, None when it varies per sample. Only
    ``None`` makes sub-batch execution read ``executed`` back to the host (one synchronisation on a GPU).
    """

    executed: torch.Tensor
    value: torch.Tensor
    mask: bool
    uniform: bool | None = None


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard``'s values with ``soft``'s gradient."""
    return hard + soft - soft.detach()


# --------------------------------------------------------------------------------------------------------------
# Gate functions: the training-time relaxations, one registered function each
# --------------------------------------------------------------------------------------------------------------

#: ``fn(score, slope) -> Decision``: scores [B] and the current hard-sigmoid slope (a float or a 0-dim tensor: the
#: model passes its ``slope`` buffer as is, because ``float()`` of a GPU tensor waits for the GPU) give the
#: training decision, always executed by masking (``mask=True``) so that the gate values carry their gradient.
GateFunction = Callable[[torch.Tensor, "float | torch.Tensor"], Decision]
_Fn = TypeVar("_Fn", bound=GateFunction)

_GATE_FUNCTIONS: dict[str, GateFunction] = {}


def register_gate_function(name: str, fn: _Fn | None = None) -> Callable[[_Fn], _Fn] | _Fn:
    """Register ``fn`` as gate function ``name``; without ``fn``, a decorator: ``@register_gate_function("x")``."""
    def add(f: _Fn) -> _Fn:
        _GATE_FUNCTIONS[name] = f
        return f
    return add(fn) if fn is not None else add


def unregister_gate_function(name: str) -> None:
    """Forget gate function ``name`` (a plug-in's or a test's); UnknownNameError if it is not registered."""
    if name not in _GATE_FUNCTIONS:
        raise UnknownNameError("gate function", name, list_gate_functions())
    del _GATE_FUNCTIONS[name]


def list_gate_functions() -> list[str]:
    """Names of the registered gate functions, sorted."""
    return sorted(_GATE_FUNCTIONS)


def gate_function(name: str) -> GateFunction:
    """The registered gate function ``name``; UnknownNameError listing the others."""
    if name not in _GATE_FUNCTIONS:
        raise UnknownNameError("gate function", name, list_gate_functions())
    return _GATE_FUNCTIONS[name]


@register_gate_function("hardsig")
def hardsig(score: torch.Tensor, slope: float | torch.Tensor) -> Decision:
    """CVPR'18 DSN: ``clamp(k*s + 0.5, 0, 1)`` with the annealed slope ``k``."""
    value = torch.clamp(slope * score + 0.5, 0.0, 1.0)
    return Decision(executed=value > 0, value=value, mask=True)


@register_gate_function("ste")
def ste(score: torch.Tensor, slope: float | torch.Tensor) -> Decision:
    """SkipNet: hard threshold forward, sigmoid derivative backward."""
    hard = (score > 0).float()
    return Decision(executed=hard > 0, value=straight_through(hard, torch.sigmoid(score)), mask=True)


@register_gate_function("gumbel")
def gumbel(score: torch.Tensor, slope: float | torch.Tensor, tau: float = 1.0) -> Decision:
    """ConvNet-AIG: straight-through Gumbel-sigmoid (noise from the global torch generator)."""
    u = torch.rand_like(score).clamp_(1e-6, 1 - 1e-6)
    soft = torch.sigmoid((score + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).float()
    return Decision(executed=hard > 0, value=straight_through(hard, soft), mask=True)


def train_decision(score: torch.Tensor, gate_fn: str, slope: float | torch.Tensor) -> Decision:
    """The training-time relaxation of gate function ``gate_fn`` (always executed by masking)."""
    return gate_function(gate_fn)(score, slope)


def eval_decision(score: torch.Tensor, state: GateState, rate: torch.Tensor | None, frozen: torch.Tensor | None,
                  temperature: torch.Tensor | None = None, frozen_uniform: bool | None = None) -> Decision:
    """The decision in an evaluation forward mode (see module docstring).

    ``temperature``: this gate's temperature (a scalar tensor), used by the internal mode ``sharpened`` only.
    ``rate``: this gate's measured execution rate (a scalar tensor), used by mode ``random`` only.
    ``frozen_uniform``: in ``frozen`` mode, whether this gate's column of the path is all ones (True), all zeros
    (False) or mixed (None), as read once per forward by the model.
    """
    mode = state.mode
    if mode == "open":
        ones = torch.ones_like(score)
        return Decision(executed=ones > 0, value=ones, mask=state.execution == "mask", uniform=True)
    if mode == "soft":
        return Decision(executed=torch.ones_like(score, dtype=torch.bool), value=torch.sigmoid(score), mask=True)
    if mode == "sharpened":
        # in float32: under autocast a half-precision score over a temperature near 1e-6 would lose its digits
        value = torch.sigmoid(score.float() / temperature.to(score.device, torch.float32)).to(score.dtype)
        return Decision(executed=torch.ones_like(score, dtype=torch.bool), value=value, mask=True)
    if mode == "sample":
        soft = torch.sigmoid(score)
        hard = torch.bernoulli(soft.detach())
        return Decision(executed=hard > 0, value=straight_through(hard, soft), mask=True)
    if mode == "random":
        hard = torch.bernoulli(rate.to(score).expand_as(score))
    elif mode == "frozen":
        hard = frozen.to(score.device, torch.float32)
    else:  # hard: one comparison and one cast per gate, the executed bits and their values
        executed = score > 0
        hard = executed.float()
        routed = routing_gradient(state.gate_grad).hard_decision(score, executed, hard)
        if routed is not None:
            return routed
        return Decision(executed=executed, value=hard, mask=state.execution == "mask")
    # frozen_uniform is None outside frozen mode: random decisions vary per sample
    return Decision(executed=hard > 0, value=hard.detach(), mask=state.execution == "mask", uniform=frozen_uniform)


def hardsig_slope(epoch: int, start: float = 1.0, growth: float = 1.0, max_slope: float = 50.0) -> float:
    """Annealed slope ``k`` of the hard sigmoid after ``epoch`` gated epochs (CVPR'18 DSN raises it each epoch)."""
    return float(min(max_slope, start + growth * max(epoch, 0)))


def run_block(block: nn.Module, x: torch.Tensor, d: Decision, inplace: bool = False,
              skip: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Run ``block`` where decision ``d`` says so and the skip path elsewhere: on the executed sub-batch only, or on
    all samples with a mask (``s + v * (block(x) - s)``, ``s = skip(x)``).

    ``skip`` is what a skipped sample gets: None is the identity (a residual block), a module such as a gated
    stride-2 block's projection shortcut gives the block's output shape (SkipNet and ConvNet-AIG gate those too).
    Only a decision that varies per sample (``d.uniform is None``) reads the decisions back to the host: on a GPU
    that ``nonzero`` is a synchronisation, which an open or frozen-uniform forward must not pay per block.
    ``inplace``: the caller holds no other reference to ``x``, so a sub-batch result may be written into it where
    nothing differentiates through ``x`` (saves a copy of the whole batch per gated block; identity skip only).
    """
    if skip is not None:
        return _run_or_skip(block, skip, x, d)
    if d.mask:
        return x + per_sample(d.value, x) * (block(x) - x)
    if d.uniform is not None:
        return block(x) if d.uniform else x
    idx = d.executed.nonzero().squeeze(1)
    if idx.numel() == x.shape[0]:
        return block(x)
    if idx.numel() == 0:
        return x
    y = block(x.index_select(0, idx))
    if inplace and y.dtype == x.dtype and not x.requires_grad:
        return x.index_copy_(0, idx, y)
    return x.to(y.dtype).index_copy(0, idx, y)  # under autocast the block may return a narrower dtype


def _run_or_skip(block: nn.Module, skip: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                 d: Decision) -> torch.Tensor:
    """:func:`run_block` with a skip function: each sample gets ``block(x)`` or ``skip(x)`` (whose shapes agree and
    may differ from ``x``'s); in sub-batch execution each of the two runs on its own samples only."""
    if d.mask:
        s = skip(x)
        return s + per_sample(d.value, s) * (block(x) - s)
    if d.uniform is not None:
        return block(x) if d.uniform else skip(x)
    run = d.executed.nonzero().squeeze(1)
    if run.numel() in (0, x.shape[0]):
        return block(x) if run.numel() else skip(x)
    rest = (~d.executed).nonzero().squeeze(1)
    ran, skipped = block(x.index_select(0, run)), skip(x.index_select(0, rest))
    if ran.shape[1:] != skipped.shape[1:]:
        raise ConfigError(f"a gated block returns shape {tuple(ran.shape[1:])} but its skip path "
                          f"{tuple(skipped.shape[1:])}: both must give the block's output shape")
    dtype = torch.promote_types(ran.dtype, skipped.dtype)
    out = ran.new_empty((x.shape[0], *ran.shape[1:]), dtype=dtype)
    return out.index_copy(0, run, ran.to(dtype)).index_copy(0, rest, skipped.to(dtype))
