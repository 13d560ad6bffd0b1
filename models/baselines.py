"""Static twins of DSN: ``resnet`` (one branch, two heads) and ``dual`` (DSN's topology without gates)."""
from __future__ import annotations

from typing import Sequence

import torch

from models.blocks import Stem, init_weights, make_stage
from models.cost import CostTable, count_macs
from models.gates import GateState
from models.network import CoarseFineNet, ModelOutput


class ResNet(CoarseFineNet):
    """CIFAR ResNet-(6n+2) with a fine head and a coarse head on the same pooled features; nothing is skipped."""

    def __init__(self, *, num_fine: int, num_coarse: int, depth_n: int = 3, width: int = 16,
                 image_size: int = 32, in_channels: int = 3,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25), **ignored):
        super().__init__(mean, std)
        self.stem = Stem(in_channels, width)
        self.stages = torch.nn.ModuleList([make_stage(width, width, depth_n, 1),
                                           make_stage(width, 2 * width, depth_n, 2),
                                           make_stage(2 * width, 4 * width, depth_n, 2)])
        self.fine_head = torch.nn.Linear(4 * width, num_fine)
        self.coarse_head = torch.nn.Linear(4 * width, num_coarse)
        init_weights(self)
        was = self.training
        self.eval()
        full = count_macs(lambda x: self._run(x, GateState()), torch.zeros(1, in_channels, image_size, image_size))
        self.train(was)
        self.costs = CostTable(full=full, always_on=full, gated_blocks=())

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        h = self.stem(self.normalize(x))
        for stage in self.stages:
            for block in stage:
                h = block(h)
        pooled = h.mean(dim=(2, 3))
        return ModelOutput(fine=self.fine_head(pooled), coarse=self.coarse_head(pooled),
                           macs=self.costs.per_sample(x.new_zeros(x.shape[0], 0)))
