"""What one forward costs in dispatched work, beside what it costs in time: operator calls, kernel launches and
host synchronisations, counted with ``torch.profiler`` (works on a CPU too).

A gated network can be slow for reasons MACs do not see: every gate adds a few small operators (on a GPU, a few
kernel launches the GPU waits on Python for), and every read of a device tensor on the host (``nonzero``,
``.item()``, ``if tensor:``) stalls the CUDA stream. :func:`count_ops` gives, for one call of a function:

- ``aten_ops``: every ``aten::`` event, nested ones included (``aten::conv2d`` -> ``aten::convolution`` ->
  ``aten::_convolution`` -> ... count once each);
- ``aten_top``: the ``aten::`` events with no ``aten::`` ancestor, i.e. the operators Python dispatched;
- ``kernels``: CUDA kernel launches seen on the device (memcpy and memset excluded); ``None`` on a CPU;
- ``host_syncs``: calls of ``aten::nonzero``, ``aten::_local_scalar_dense`` (``.item()``, ``float(t)``) and
  ``aten::is_nonzero`` (``bool(t)``): each one waits for the device on CUDA;
- ``d2h_copies``: device-to-host memcpy events on CUDA (``None`` on a CPU). Reported apart, not added to
  ``host_syncs``: ``nonzero`` and ``.item()`` each make one such copy themselves, so a sum would count them twice.

Pitfall: nested events double-count, so a model that calls ``F.conv2d`` looks like four operators per convolution
in ``aten_ops`` and one in ``aten_top``; compare like with like (the dsn's ``aten_top`` against the twin's).
The function runs once before profiling (warm-up: lazy initialisation, cuDNN autotuning and caches stay out of
the count). The caller chooses the grad mode (the benchmark counts under ``torch.no_grad()``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile

#: operators that read a device value back to the host (a stream synchronisation on CUDA)
SYNC_OPS = frozenset({"aten::nonzero", "aten::_local_scalar_dense", "aten::is_nonzero"})


@dataclass(frozen=True)
class OpCounts:
    """Dispatched work of one call; see the module docstring for what each number counts."""

    aten_ops: int
    aten_top: int
    kernels: int | None
    host_syncs: int
    d2h_copies: int | None

    def to_dict(self) -> dict:
        return asdict(self)


def _has_aten_ancestor(event) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def _is_device_event(event) -> bool:
    return event.device_type == torch.autograd.DeviceType.CUDA


def count_ops(fn: Callable[[], object], cuda: bool | None = None) -> OpCounts:
    """Profile one call of ``fn`` (after one unprofiled warm-up call); ``cuda``: also record CUDA activity
    (default: when CUDA is available)."""
    cuda = torch.cuda.is_available() if cuda is None else cuda
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def call() -> None:
        fn()
        if cuda:
            torch.cuda.synchronize()

    call()
    with profile(activities=activities) as prof:
        call()
    events = list(prof.events())
    host = [e for e in events if not _is_device_event(e)]
    aten = [e for e in host if e.name.startswith("aten::")]
    device = [e for e in events if _is_device_event(e)]
    return OpCounts(
        aten_ops=len(aten),
        aten_top=sum(1 for e in aten if not _has_aten_ancestor(e)),
        kernels=sum(1 for e in device if not e.name.startswith(("Memcpy", "Memset"))) if cuda else None,
        host_syncs=sum(1 for e in aten if e.name in SYNC_OPS),
        d2h_copies=sum(1 for e in device if e.name.startswith("Memcpy DtoH")) if cuda else None,
    )
