"""A ConvNet-AIG-style gated ResNet written against the suite's score-gate protocol, with no import of the suite.

ConvNet-AIG (Veit & Belongie, ECCV'18) gates each residual block with a small network on the block's input:
global average pool -> 1x1 conv to 16 -> BN -> ReLU -> two logits (skip, run). The block runs when the "run" logit
wins, i.e. when ``score = run - skip > 0``: the ``s > 0`` rule that ``models.protocol.ScoreGated`` expects. The
downsampling block (stride 2, channels x2) is gated too: a sample that skips it takes its projection shortcut
(1x1 conv stride 2 + BN). ConvNet-AIG can also keep its Gumbel noise at test time (``gumbel_at_test``): each eval
forward then adds logistic noise ``log(u) - log(1 - u)``, ``u ~ U(0, 1)`` from torch's global generator, to every
score, so two forwards of one input may take different paths (a randomised network; off by default).

What makes it a suite model is two members (see ``models/protocol.py``):

* ``gate_names``: one name per gated block, in the order ``forward_scored`` calls the gate;
* ``forward_scored(x, gate)``: the network, calling ``h = gate(score, block, h, skip=block.shortcut)`` at each
  gated block (``skip`` None is the identity; the suite decides, per gate mode and routing gradient, whether and
  how the block runs).

``forward(x)`` is what the model does on its own (hard gates, every block computed and masked): handy for
training it elsewhere, and the reference the suite's fidelity check compares with. Use it from the CLI as
``--model-file examples/convnet_aig.py:build``.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Residual(nn.Module):
    """A CIFAR BasicBlock ``relu(shortcut(x) + bn(conv(relu(bn(conv(x))))))``; ``shortcut`` is the identity
    (None) unless the block downsamples (``stride`` 2, ``c_out`` = 2 ``c_in``): then a 1x1 projection + BN."""

    def __init__(self, c_in: int, c_out: int | None = None, stride: int = 1):
        super().__init__()
        c_out = c_out or c_in
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = None if stride == 1 and c_in == c_out else nn.Sequential(
            nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu((x if self.shortcut is None else self.shortcut(x)) + self.bn2(self.conv2(out)))


class AIGGate(nn.Module):
    """GAP -> 1x1 conv -> BN -> ReLU -> 2 logits; returns ``run - skip`` [B]. The bias starts the gate open.

    ``gumbel_at_test``: in eval mode, add logistic (Gumbel-difference) noise to the score (ConvNet-AIG's
    stochastic inference); training mode is never noisy here."""

    def __init__(self, channels: int, hidden: int = 16, gumbel_at_test: bool = False):
        super().__init__()
        self.gumbel_at_test = gumbel_at_test
        self.squeeze = nn.Conv2d(channels, hidden, 1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.decide = nn.Conv2d(hidden, 2, 1)
        with torch.no_grad():
            self.decide.bias.copy_(torch.tensor([0.1, 2.0]))  # ConvNet-AIG's open initialisation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.squeeze(x.mean(dim=(2, 3), keepdim=True))))
        logits = self.decide(h).flatten(1)
        score = logits[:, 1] - logits[:, 0]
        if self.gumbel_at_test and not self.training:
            u = torch.rand_like(score).clamp_(1e-6, 1 - 1e-6)  # torch's global generator; clamped off log(0)
            score = score + torch.log(u) - torch.log1p(-u)
        return score


class ConvNetAIG(nn.Module):
    """Stem, two stages of gated residual blocks (stage 2 starts with a gated downsampling block), a linear head."""

    def __init__(self, num_classes: int = 10, width: int = 8, depth: int = 2, in_channels: int = 3,
                 gumbel_at_test: bool = False):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        w2 = 2 * width
        self.stages = nn.ModuleList([nn.ModuleList([Residual(width) for _ in range(depth)]),
                                     nn.ModuleList([Residual(width, w2, stride=2),
                                                    *(Residual(w2) for _ in range(depth))])])
        self.gates = nn.ModuleList([nn.ModuleList([AIGGate(c, gumbel_at_test=gumbel_at_test) for c in cs])
                                    for cs in ([width] * depth, [width] + [w2] * depth)])
        self.head = nn.Linear(w2, num_classes)
        self.gate_names = ([f"s1.b{b + 1}" for b in range(depth)] + ["s2.down"]
                           + [f"s2.b{b + 1}" for b in range(depth)])

    def forward_scored(self, x: torch.Tensor, gate) -> torch.Tensor:
        h = self.stem(x)
        for blocks, gates in zip(self.stages, self.gates):
            for block, scorer in zip(blocks, gates):
                h = gate(scorer(h), block, h, skip=block.shortcut)
        return self.head(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def hard(score: torch.Tensor, block: nn.Module, h: torch.Tensor, skip=None) -> torch.Tensor:
            run = (score > 0).float().view(-1, 1, 1, 1)
            rest = h if skip is None else skip(h)
            return rest + run * (block(h) - rest)
        return self.forward_scored(x, hard)


def build(num_classes: int = 10, width: int = 8, depth: int = 2, in_channels: int = 3,
          gumbel_at_test: bool = False) -> ConvNetAIG:
    """The factory ``--model-file examples/convnet_aig.py:build`` calls."""
    return ConvNetAIG(num_classes=num_classes, width=width, depth=depth, in_channels=in_channels,
                      gumbel_at_test=gumbel_at_test)
