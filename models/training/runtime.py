"""How a training run uses its device: thread count and determinism switches, AMP autocast, batch placement.

On CPU a deterministic run is reproducible bit for bit (and so is its resume); on CUDA, AMP (float16 autocast)
and channels-last memory are used when the config asks for them.
"""
from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Any, ContextManager, Iterator

import torch

from models.training.config import TrainConfig
from robustness.core.runtime import torch_threads


@contextmanager
def run_settings(config: TrainConfig, device: torch.device) -> Iterator[None]:
    """Thread count and determinism switches for the run; the caller's settings are restored afterwards."""
    import torch.utils.deterministic as det
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(), det.fill_uninitialized_memory)
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if device.type == "cpu" and config.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        det.fill_uninitialized_memory = False  # NaN-filling every new tensor costs time and buys nothing here
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not config.deterministic
        torch.backends.cudnn.deterministic = config.deterministic
    try:
        with torch_threads(config.threads):
            yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        det.fill_uninitialized_memory = previous[2]
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


def autocast(device: torch.device, amp: bool) -> ContextManager[Any]:
    """float16 autocast on CUDA when ``amp``; otherwise nothing."""
    if amp and device.type == "cuda":
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    return nullcontext()


def to_device(x: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    """``x`` on ``device``, in channels-last memory when asked."""
    x = x.to(device, non_blocking=True)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    return x
