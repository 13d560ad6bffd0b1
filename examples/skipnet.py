"""A SkipNet-style gated CIFAR ResNet, written as a researcher's own code: it knows nothing of the suite.

SkipNet (Wang et al., ECCV'18, "SkipNet: Learning Dynamic Routing in Convolutional Networks") puts a small
feed-forward gate in front of every residual block: a 3x3 conv -> BN -> ReLU on the block's input, a global average
pool, a 1x1 conv to one logit per sample. The block runs when the gate says so (``score > 0``, the hard threshold of
its sigmoid), otherwise the sample takes the block's skip path: the identity, or for a block that downsamples
(stride 2, channels x2) its projection shortcut (1x1 conv stride 2 + BN). Those downsampling blocks are gated too.

``forward(x)`` computes every block and masks it, ``run * block(h) + (1 - run) * skip(h)``, as published
layer-skipping code often does: right predictions, no compute saved. ``examples/skipnet_adapter.py`` is the adapter
that makes it a suite model (and really skips); the suite's fidelity check compares the two forwards.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    """A CIFAR BasicBlock; with ``stride`` 2 it doubles the channels and ``shortcut`` is its 1x1 projection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class FFGate(nn.Module):
    """SkipNet's feed-forward gate: 3x3 conv -> BN -> ReLU -> global pool -> 1x1 conv; a score [B], open at start."""

    def __init__(self, channels: int, hidden: int = 8, open_bias: float = 2.0):
        super().__init__()
        self.conv = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.decide = nn.Conv2d(hidden, 1, 1)
        with torch.no_grad():
            self.decide.bias.fill_(open_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.adaptive_avg_pool2d(F.relu(self.bn(self.conv(x))), 1)
        return self.decide(h).flatten(1)[:, 0]  # never squeeze(): a batch of one keeps its batch dimension


class SkipNet(nn.Module):
    """Stem, three stages of ``depth`` gated blocks (stages 2 and 3 start with a gated stride-2 block), a head."""

    def __init__(self, num_classes: int = 10, width: int = 8, depth: int = 1, in_channels: int = 3):
        super().__init__()
        self.depth = depth
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        widths = [width, 2 * width, 4 * width]
        blocks, gates = [], []
        for s, c in enumerate(widths):
            for b in range(depth):
                c_in = widths[s - 1] if s and not b else c
                blocks.append(Block(c_in, c, stride=2 if s and not b else 1))
                gates.append(FFGate(c_in))
        self.blocks, self.gates = nn.ModuleList(blocks), nn.ModuleList(gates)
        self.head = nn.Linear(widths[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stem(x)
        for block, gate in zip(self.blocks, self.gates):
            score = gate(h)
            run = (score > 0).float()
            if self.training:  # straight-through: the hard decision forward, the sigmoid's gradient backward
                soft = torch.sigmoid(score)
                run = run + soft - soft.detach()
            run = run.view(-1, 1, 1, 1)
            rest = h if block.shortcut is None else block.shortcut(h)
            h = run * block(h) + (1 - run) * rest  # every block computed, then masked: no compute saved
        return self.head(h.mean(dim=(2, 3)))
