"""The single-branch static baseline ``resnet`` (one branch, two heads), registered with its own options.

DSN's other static twin, ``dual`` (DSN's topology without gates), lives beside DSN in ``models.dsn``.
"""
from __future__ import annotations

from typing import Sequence

import torch

from models.blocks import Stem, check_size, init_weights, make_stage
from models.cost import CostTable, architecture_costs, count_macs
from models.gates import GateState
from models.network import DEFAULT_MEAN, DEFAULT_STD, CoarseFineNet, ModelOutput
from models.registry import register_model


class ResNet(CoarseFineNet):
    """CIFAR ResNet-(6n+2) with a fine head and a coarse head on the same pooled features; nothing is skipped."""

    def __init__(self, *, num_fine: int, num_coarse: int, depth_n: int, width: int, image_size: int,
                 in_channels: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__(mean, std)
        self.stem = Stem(in_channels, width)
        self.stages = torch.nn.ModuleList([make_stage(width, width, depth_n, 1),
                                           make_stage(width, 2 * width, depth_n, 2),
                                           make_stage(2 * width, 4 * width, depth_n, 2)])
        self.fine_head = torch.nn.Linear(4 * width, num_fine)
        self.coarse_head = torch.nn.Linear(4 * width, num_coarse)
        init_weights(self)
        self.costs = architecture_costs(("resnet", num_fine, num_coarse, depth_n, width, image_size, in_channels),
                                        lambda: self._measure(in_channels, image_size))

    def _measure(self, in_channels: int, image_size: int) -> CostTable:
        was = self.training
        self.eval()
        full = count_macs(lambda x: self._run(x, GateState()), torch.zeros(1, in_channels, image_size, image_size))
        self.train(was)
        return CostTable(full=full, always_on=full, gated_blocks=())

    def _run(self, x: torch.Tensor, state: GateState) -> ModelOutput:
        h = self.stem(self.normalize(x))
        for stage in self.stages:
            for block in stage:
                h = block(h)
        pooled = h.mean(dim=(2, 3))
        return ModelOutput(fine=self.fine_head(pooled), coarse=self.coarse_head(pooled),
                           macs=self.costs.per_sample(x.new_zeros(x.shape[0], 0)))


@register_model
def resnet(*, num_fine: int, num_coarse: int, depth_n: int = 3, width: int = 16, image_size: int = 32,
           in_channels: int = 3, mean: Sequence[float] = DEFAULT_MEAN, std: Sequence[float] = DEFAULT_STD) -> ResNet:
    """Single-branch CIFAR ResNet-(6n+2) with fine and coarse heads."""
    check_size(depth_n, width)
    return ResNet(num_fine=num_fine, num_coarse=num_coarse, depth_n=depth_n, width=width, image_size=image_size,
                  in_channels=in_channels, mean=mean, std=std)
