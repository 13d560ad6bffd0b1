"""DSN: a shared trunk feeding a coarse and a fine branch with per-block gates, top-down feedback and FiLM.

This is a *reconstruction* (DESIGN.md, "The model"): the TIP 2020 paper's code is not available. Confirmed by the
papers: two jointly trained branches (coarse, fine), a gating network giving per-input inference graphs, ranking
loss for the gates, top-down feedback from coarse to fine, FiLM encoding of the selected path. Our choices: CIFAR
ResNet-6n+2 with BasicBlocks; trunk = stem + stage 1 (never skipped); each branch = stages 2-3; every block but a
stage's first has a gate reading the block input; feedback = coarse stage-3 output -> 1x1 conv -> bilinear resize
-> concatenated to the fine branch's stage-3 input; FiLM = MLP(path bits) -> (gamma, beta) on the fine features
before pooling, zero-initialised so it starts as the identity.

With ``gated=False`` the same topology without gates (and without FiLM) is the static twin ``dual``. This module
registers both: the entrypoints ``dsn`` and ``dual`` declare each model's own options and their defaults.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from models.blocks import BasicBlock, Stem, check_size, init_weights, make_stage
from models.cost import architecture_costs, measure_costs
from models.folding import ParameterConstant, differentiable_or_cached, in_training
from models.gates import Decision, Gate, GateState, eval_decision, gate_function, run_block, train_decision
from models.network import DEFAULT_MEAN, DEFAULT_STD, CoarseFineNet, ModelOutput
from models.registry import register_model
from robustness.core.errors import ConfigError

BRANCHES = ("coarse", "fine")


class Branch(nn.Module):
    """Stages 2 and 3 of a CIFAR ResNet, with a gate on every block but each stage's first."""

    def __init__(self, in_planes: int, widths: Sequence[int], n: int, gated: bool, extra_s3_in: int,
                 gate_hidden: int, open_bias: float):
        super().__init__()
        self.stages = nn.ModuleList([
            make_stage(in_planes, widths[0], n, stride=2),
            make_stage(widths[0] + extra_s3_in, widths[1], n, stride=2),
        ])
        self.gates = nn.ModuleList([
            nn.ModuleList([Gate(stage[j].conv1.in_channels, gate_hidden, open_bias) for j in range(1, n)] if gated
                          else [])
            for stage in self.stages
        ])

    def gated_blocks(self) -> list[BasicBlock]:
        return [b for stage, gates in zip(self.stages, self.gates) for b in list(stage)[1:len(gates) + 1]]


def _uniform_columns(path: torch.Tensor) -> list[bool | None]:
    """Per gate of a frozen ``path`` [B, n_gates]: True (every sample runs it), False (none does) or None (mixed).

    Read to the host once per forward, instead of once per gated block.
    """
    bits = path > 0.5
    summary = torch.stack([bits.all(0), (~bits).all(0)]).tolist()
    return [True if every else False if nobody else None for every, nobody in zip(*summary)]


class DSN(CoarseFineNet):
    """Dual-branch layer-skippable network. See the module docstring for the topology."""

    def __init__(self, *, num_fine: int, num_coarse: int, depth_n: int, width: int, gated: bool, gate_fn: str,
                 feedback: bool, film: bool, feedback_channels: int | None, gate_hidden: int, open_bias: float,
                 image_size: int, in_channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        w1, w2, w3 = width, 2 * width, 4 * width
        fb = (feedback_channels or w1) if feedback else 0
        self.gate_fn = gate_fn
        self.stem = Stem(in_channels, w1)
        self.trunk = make_stage(w1, w1, depth_n, stride=1)
        self.coarse = Branch(w1, (w2, w3), depth_n, gated, 0, gate_hidden, open_bias)
        self.fine = Branch(w1, (w2, w3), depth_n, gated, fb, gate_hidden, open_bias)
        self.feedback = nn.Sequential(nn.Conv2d(w3, fb, 1, bias=False), nn.BatchNorm2d(fb), nn.ReLU()) if fb else None
        n_gates = 2 * 2 * (depth_n - 1) if gated else 0
        self.film = nn.Sequential(nn.Linear(n_gates, 32), nn.ReLU(), nn.Linear(32, 2 * w3)) \
            if film and n_gates else None
        self.fine_head = nn.Linear(w3, num_fine)
        self.coarse_head = nn.Linear(w3, num_coarse)
        init_weights(self)
        if self.film is not None:
            nn.init.zeros_(self.film[-1].weight)
            nn.init.zeros_(self.film[-1].bias)
        self._open_film = ParameterConstant()
        self.register_buffer("gate_rate", torch.ones(n_gates))
        self.register_buffer("slope", torch.tensor(1.0))
        architecture = ("dsn", num_fine, num_coarse, depth_n, width, gated, fb, film, gate_hidden, image_size,
                        in_channels)
        self.costs = architecture_costs(architecture, lambda: measure_costs(
            self, self.coarse.gated_blocks() + self.fine.gated_blocks(), (in_channels, image_size, image_size),
            lambda x: self._run(x, GateState(mode="open"))))

    @property
    def gate_names(self) -> list[str]:
        return [f"{name}.s{s + 2}.b{j + 1}" for name in BRANCHES
                for s, gates in enumerate(getattr(self, name).gates) for j in range(len(gates))]

    def _branch_stage(self, branch: Branch, s: int, x: torch.Tensor, state: GateState, offset: int,
                      scores: list[torch.Tensor], decisions: list[Decision],
                      frozen_uniform: list[bool | None]) -> torch.Tensor:
        """One stage of a branch; ``scores`` collects score columns [B, 1]. In ``open`` mode no decision is built:
        every block runs."""
        stage, gates = branch.stages[s], branch.gates[s]
        x = stage[0](x)
        for j, gate in enumerate(gates):
            column = gate.column(x)
            scores.append(column)
            if state.mode == "open":
                x = stage[j + 1](x)
                continue
            score = column.squeeze(1)
            k = offset + len(decisions)
            if self.training:
                d = train_decision(score, self.gate_fn, self.slope)
            else:
                frozen = state.path[:, k] if state.mode == "frozen" else None
                temperature = state.temperature[k] if state.mode == "sharpened" else None
                rate = self.gate_rate[k] if state.mode == "random" else None
                d = eval_decision(score, state, rate, frozen, temperature,
                                  frozen_uniform[k] if frozen_uniform else None)
            decisions.append(d)
            x = run_block(stage[j + 1], x, d, inplace=True)  # x is this stage's own intermediate
        for block in list(stage)[len(gates) + 1:]:
            x = block(x)
        return x

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        if state.mode == "frozen" and state.path.shape[1] != self.n_gates:
            raise ValueError(f"frozen path has {state.path.shape[1]} bits, model has {self.n_gates} gates")
        uniform = _uniform_columns(state.path) if state.mode == "frozen" and not self.training else []
        h = self.stem(self.normalize(x))
        for block in self.trunk:
            h = block(h)
        scores: dict[str, list[torch.Tensor]] = {"coarse": [], "fine": []}
        decisions: dict[str, list[Decision]] = {"coarse": [], "fine": []}
        n_coarse_gates = sum(len(g) for g in self.coarse.gates)

        c = self._branch_stage(self.coarse, 0, h, state, 0, scores["coarse"], decisions["coarse"], uniform)
        c = self._branch_stage(self.coarse, 1, c, state, 0, scores["coarse"], decisions["coarse"], uniform)
        f = self._branch_stage(self.fine, 0, h, state, n_coarse_gates, scores["fine"], decisions["fine"], uniform)
        if self.feedback is not None:
            top_down = F.interpolate(self.feedback(c), size=f.shape[-2:], mode="bilinear", align_corners=False)
            f = torch.cat([f, top_down], dim=1)
        f = self._branch_stage(self.fine, 1, f, state, n_coarse_gates, scores["fine"], decisions["fine"], uniform)

        stacked = {b: torch.cat(s, 1) for b, s in scores.items() if s}
        if state.mode == "open":  # every block ran: the executed bits and the gate values are all ones
            gates = {b: x.new_ones(x.shape[0], len(s)) for b, s in scores.items() if s}
            values = gates
        else:
            gates = {b: torch.stack([d.executed for d in ds], 1).float() for b, ds in decisions.items() if ds}
            values = {b: torch.stack([d.value for d in ds], 1) for b, ds in decisions.items() if ds}
        if self.film is not None:
            f = self._modulate(f, values, open_path=state.mode == "open")
        fine = self.fine_head(f.mean(dim=(2, 3)))
        coarse = self.coarse_head(c.mean(dim=(2, 3)))
        if state.mode == "open":
            macs = self.costs.constant(x.shape[0], self.costs.full, x.device)
        else:
            macs = self.costs.per_sample(torch.cat(list(gates.values()), 1) if gates else x.new_zeros(x.shape[0], 0))
        return ModelOutput(fine=fine, coarse=coarse, macs=macs, gates=gates, scores=stacked, values=values)

    def _modulate(self, f: torch.Tensor, values: dict[str, torch.Tensor], open_path: bool) -> torch.Tensor:
        """FiLM of the path: ``f * (1 + gamma) + beta`` with ``(gamma, beta) = film(gate values)``.

        In an evaluation forward of the all-open path every sample has the same input, so ``(1 + gamma, beta)`` is
        computed once for the batch (and cached while the weights are frozen: :mod:`models.folding`).
        """
        if open_path and not in_training(self.film):
            scale, shift = differentiable_or_cached(self.film, self._open_film, tuple(self.film.parameters()),
                                                    self._film_of_open_path)
        else:
            gamma, shift = self.film(torch.cat(list(values.values()), 1)).view(f.shape[0], 2, -1, 1, 1).unbind(1)
            scale = 1 + gamma
        return torch.addcmul(shift, f, scale)

    def train(self, mode: bool = True) -> "DSN":
        self._open_film.clear()  # see models/folding.py: edits through .data bump no version
        return super().train(mode)

    def _film_of_open_path(self) -> tuple[torch.Tensor, torch.Tensor]:
        gamma, beta = self.film(self.film[0].weight.new_ones(1, self.n_gates)).view(1, 2, -1, 1, 1).unbind(1)
        return 1 + gamma, beta


@register_model
def dsn(*, num_fine: int, num_coarse: int, depth_n: int = 3, width: int = 16, gate_fn: str = "hardsig",
        feedback: bool = True, film: bool = True, feedback_channels: int | None = None, gate_hidden: int = 16,
        open_bias: float = 0.4, image_size: int = 32, in_channels: int = 3,
        mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> DSN:
    """DSN: trunk + gated coarse and fine branches, feedback, FiLM on the path (our reconstruction)."""
    check_size(depth_n, width)
    gate_function(gate_fn)  # an unknown name is an UnknownNameError listing the registered ones
    if depth_n < 2:
        raise ConfigError("dsn needs depth_n >= 2: a stage's first block is never gated")
    return DSN(num_fine=num_fine, num_coarse=num_coarse, depth_n=depth_n, width=width, gated=True, gate_fn=gate_fn,
               feedback=feedback, film=film, feedback_channels=feedback_channels, gate_hidden=gate_hidden,
               open_bias=open_bias, image_size=image_size, in_channels=in_channels, mean=mean, std=std)


@register_model
def dual(*, num_fine: int, num_coarse: int, depth_n: int = 3, width: int = 16, feedback: bool = True,
         feedback_channels: int | None = None, image_size: int = 32, in_channels: int = 3,
         mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> DSN:
    """DSN's topology (trunk, coarse and fine branches, feedback) without gates or FiLM: the static twin."""
    check_size(depth_n, width)
    # gate_fn, gate_hidden and open_bias only shape gates, and an ungated DSN has none: fixed placeholders
    return DSN(num_fine=num_fine, num_coarse=num_coarse, depth_n=depth_n, width=width, gated=False,
               gate_fn="hardsig", feedback=feedback, film=False, feedback_channels=feedback_channels,
               gate_hidden=16, open_bias=0.4, image_size=image_size, in_channels=in_channels, mean=mean, std=std)
