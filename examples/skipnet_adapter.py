"""The adapter that makes ``examples/skipnet.py`` (a researcher's SkipNet, unchanged) a suite model.

Two members are all the suite needs (``models/protocol.py``): ``gate_names``, one per gated block in call order,
and ``forward_scored(x, gate)``, the network's forward with each gated block written as
``h = gate(score, block, h, skip=...)``: the suite decides per gate mode and routing gradient whether the block
runs, runs it only on the samples that need it, and counts each sample's MACs. ``skip`` is what a skipped sample
gets: None for the identity, the block's projection shortcut for a downsampling block.

``forward`` is the original network's own: ``dsn-robust check-model`` and every ``attack --model-file`` compare it
with the adapted forward, so an adapter that leaves a gate out is caught before it is attacked. Weights are this
module's ``state_dict`` (the original's keys behind ``net.``). Use it as
``--model-file examples/skipnet_adapter.py:build``; the folder of a model file is importable, so the sibling
``skipnet`` module is found.
"""
from __future__ import annotations

import torch
from torch import nn

from skipnet import SkipNet


class SuiteSkipNet(nn.Module):
    def __init__(self, net: SkipNet):
        super().__init__()
        self.net = net
        self.gate_names = [f"s{s + 1}.b{b + 1}" for s in range(3) for b in range(net.depth)]

    def forward_scored(self, x: torch.Tensor, gate) -> torch.Tensor:
        h = self.net.stem(x)
        for block, scorer in zip(self.net.blocks, self.net.gates):
            h = gate(scorer(h), block, h, skip=block.shortcut)  # shortcut None: the identity
        return self.net.head(h.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(num_classes: int = 10, width: int = 8, depth: int = 1, in_channels: int = 3) -> SuiteSkipNet:
    """The factory ``--model-file examples/skipnet_adapter.py:build`` calls."""
    return SuiteSkipNet(SkipNet(num_classes=num_classes, width=width, depth=depth, in_channels=in_channels))
