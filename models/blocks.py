"""CIFAR ResNet building blocks (He et al. 2016, the 6n+2 family) and stage construction."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from robustness.core.errors import ConfigError


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with BN and a residual connection; a 1x1 projection when the shape changes.

    ``forward(x)`` returns ``relu(F(x) + shortcut(x))``; skipping the block means returning ``x`` itself. The
    ReLUs work in place on tensors the block itself made (never on ``x``): two fewer allocations per block, and
    autograd is unaffected because BatchNorm's backward needs its input, not its output.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x), inplace=True)


class Stem(nn.Module):
    """3x3 convolution, BN, ReLU."""

    def __init__(self, in_channels: int, planes: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, planes, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)), inplace=True)


def check_size(depth_n: int, width: int) -> None:
    """ConfigError unless there is at least one block per stage and one channel."""
    if depth_n < 1 or width < 1:
        raise ConfigError("depth_n and width must be >= 1")


def make_stage(in_planes: int, planes: int, n_blocks: int, stride: int) -> nn.ModuleList:
    """``n_blocks`` BasicBlocks; the first one changes stride/width, the rest keep the shape (and can be skipped)."""
    blocks = [BasicBlock(in_planes, planes, stride)]
    blocks += [BasicBlock(planes, planes, 1) for _ in range(n_blocks - 1)]
    return nn.ModuleList(blocks)


def init_weights(module: nn.Module) -> None:
    """Kaiming-normal convolutions, unit BN, zero biases (the CIFAR ResNet convention)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
