"""A ConvNet-AIG-style gated ResNet written against the suite's score-gate protocol, with no import of the suite.

ConvNet-AIG (Veit & Belongie, ECCV'18) gates each residual block with a small network on the block's input:
global average pool -> 1x1 conv to 16 -> BN -> ReLU -> two logits (skip, run). The block runs when the "run" logit
wins, i.e. when ``score = run - skip > 0``: the ``s > 0`` rule that ``models.protocol.ScoreGated`` expects.

What makes it a suite model is two members (see ``models/protocol.py``):

* ``gate_names``: one name per gated block, in the order ``forward_scored`` calls the gate;
* ``forward_scored(x, gate)``: the network, calling ``h = gate(score, block, h)`` at each gated block (the suite
  decides, per gate mode and routing gradient, whether and how the block runs).

``forward(x)`` is what the model does on its own (hard gates, every block computed and masked): handy for
training it elsewhere, unused by the suite. Use it from the CLI as ``--model-file examples/convnet_aig.py:build``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    """A CIFAR BasicBlock without downsampling: ``relu(x + bn(conv(relu(bn(conv(x))))))``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


class AIGGate(nn.Module):
    """GAP -> 1x1 conv -> BN -> ReLU -> 2 logits; returns ``run - skip`` [B]. The bias starts the gate open."""

    def __init__(self, channels: int, hidden: int = 16):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.decide = nn.Conv2d(hidden, 2, 1)
        with torch.no_grad():
            self.decide.bias.copy_(torch.tensor([0.1, 2.0]))  # ConvNet-AIG's open initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.squeeze(x.mean(dim=(2, 3), keepdim=True))))
        logits = self.decide(h).flatten(1)
        return logits[:, 1] - logits[:, 0]


class ConvNetAIG(nn.Module):
    """Stem, ``depth`` gated residual blocks per stage over two stages (a strided conv between), a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8, depth: int = 2, in_channels: int = 3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stages = nn.ModuleList([nn.ModuleList([Residual(c) for _ in range(depth)]) for c in (width, 2 * width)])
        self.gates = nn.ModuleList([nn.ModuleList([AIGGate(c) for _ in range(depth)]) for c in (width, 2 * width)])
        self.head = nn.Linear(2 * width, num_classes)
        self.gate_names = [f"s{s + 1}.b{b + 1}" for s in range(2) for b in range(depth)]

    def forward_scored(self, x: torch.Tensor, gate) -> torch.Tensor:
        h = self.stem(x)
        for s, (blocks, gates) in enumerate(zip(self.stages, self.gates)):
            if s:
                h = self.down(h)
            for block, scorer in zip(blocks, gates):
                h = gate(scorer(h), block, h)
        return self.head(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def hard(score: torch.Tensor, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
            run = (score > 0).float().view(-1, 1, 1, 1)
            return h + run * (block(h) - h)
        return self.forward_scored(x, hard)


def build(num_classes: int = 10, width: int = 8, depth: int = 2, in_channels: int = 3) -> ConvNetAIG:
    """The factory ``--model-file examples/convnet_aig.py:build`` calls."""
    return ConvNetAIG(num_classes=num_classes, width=width, depth=depth, in_channels=in_channels)
