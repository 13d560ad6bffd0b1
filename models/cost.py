"""Multiply-accumulate counts, measured with ``torch.utils.flop_counter`` rather than by hand.

A model measures itself once at construction: the MACs of a full (every block executed) forward pass, and the
MACs of each gated block. The per-sample cost of a forward pass is then

    always-on MACs (stem, trunk, ungated blocks, gates, feedback, FiLM, heads) + sum of executed gated blocks.

A gated unit whose skip path is not the identity (a downsampling block skipped to its projection shortcut) counts
as the MACs it saves, block less shortcut: the shortcut's share goes to the always-on part.

``FlopCounterMode`` counts matrix multiplies and convolutions (2 FLOPs per MAC); element-wise work such as
BatchNorm, ReLU and pooling is not counted, as in the SkipNet / ConvNet-AIG accounting.

Pitfall: per-sample MACs are ~1e7-1e9, beyond float16 (max 65504) and beyond float32's exact integers (2^24).
Under CUDA autocast a float32 ``bits @ block_macs`` becomes a float16 matmul and overflows to inf (``MACs saved
-inf%``). The cost is therefore summed in float64 (float32 on MPS, which has no float64) with autocast off.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Hashable

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from robustness.core.runtime import accumulation_dtype


def count_macs(fn, *inputs: torch.Tensor, per_sample: bool = False) -> float:
    """MACs of ``fn(*inputs)`` as counted by torch's flop counter (one forward, no autograd); ``per_sample``:
    divided by the first input's batch size (count on a batch of two or more: a researcher's model may
    ``squeeze()`` a batch dimension of one away, as SkipNet's gates do)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*inputs)
    return counter.get_total_flops() / 2.0 / (inputs[0].shape[0] if per_sample else 1)


@dataclass(frozen=True)
class CostTable:
    """Per-sample MACs of a model: the full network (every gated unit run), the always-on part and what skipping
    each gated unit saves (in path order): its block's MACs, less its skip path's when that is not the identity (a
    gated downsampling block's projection shortcut still runs when the block is skipped)."""

    full: float
    always_on: float
    gated_blocks: tuple[float, ...]
    #: the per-block MACs as a tensor per (device, dtype): built once, not copied to the device every forward
    _tensors: dict = field(default_factory=dict, compare=False, repr=False)

    def per_sample(self, executed: torch.Tensor) -> torch.Tensor:
        """MACs per sample given executed-block bits ``executed`` of shape [B, n_gates] (coarse then fine).

        Float64 (float32 on MPS), computed outside autocast: see the module docstring.
        """
        device = executed.device
        dtype = accumulation_dtype(device)
        if not self.gated_blocks:  # a static model, or a gated one not measured yet
            return self.constant(executed.shape[0], self.always_on, device)
        key = (device, dtype)
        if key not in self._tensors:
            self._tensors[key] = torch.tensor(self.gated_blocks, dtype=dtype, device=device)
        with torch.autocast(device.type, enabled=False):
            return executed.detach().to(dtype) @ self._tensors[key] + self.always_on

    @staticmethod
    def constant(batch: int, macs: float, device: torch.device) -> torch.Tensor:
        """``macs`` for each of ``batch`` samples (a static model, or every gated block executed), in the cost
        dtype (see the module docstring)."""
        return torch.full((batch,), macs, dtype=accumulation_dtype(device), device=device)

    def to_dict(self) -> dict:
        return {"full": self.full, "always_on": self.always_on, "gated_blocks": list(self.gated_blocks)}


def measure_costs(model: nn.Module, gated_blocks: list[nn.Module], input_shape: tuple[int, ...],
                  run_open) -> CostTable:
    """Measure ``model``: ``run_open(x)`` must run a full forward with every block executed.

    The input shape of each gated block is captured with forward hooks during that pass; each block is then
    counted on its own with a one-sample input of that shape.
    """
    shapes: dict[int, tuple[int, ...]] = {}

    def recorder(k: int):
        def hook(module, inputs, output) -> None:
            shapes[k] = tuple(inputs[0].shape[1:])
        return hook

    hooks = [b.register_forward_hook(recorder(k)) for k, b in enumerate(gated_blocks)]
    was_training = model.training
    model.eval()
    try:
        x = torch.zeros(1, *input_shape, device=next(model.parameters()).device)
        full = count_macs(run_open, x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    blocks = []
    for k, b in enumerate(gated_blocks):
        was = b.training
        b.eval()
        blocks.append(count_macs(b, torch.zeros(1, *shapes[k], device=x.device)))
        b.train(was)
    return CostTable(full=full, always_on=full - sum(blocks), gated_blocks=tuple(blocks))


_MEASURED: dict[Hashable, CostTable] = {}


def architecture_costs(architecture: Hashable, measure: Callable[[], CostTable]) -> CostTable:
    """The cost table of ``architecture`` (a built-in model's class and its shape-giving options), ``measure()``d
    once per process: MACs depend on shapes alone, never on weights, and the flop counter's pass is the slow part
    of building a model (about 0.4 s for the tiny dsn; every checkpoint load builds one)."""
    if architecture not in _MEASURED:
        _MEASURED[architecture] = measure()
    return _MEASURED[architecture]
