"""``batch_size = "auto"``: how many images one attack batch holds on this device. The one owner of that choice.

CUDA: the largest batch whose most memory-hungry evaluation fits. Every distinct way the planned evaluations
run the crafting model (gate mode, routing gradient, with or without an input gradient) is measured once at
:data:`START` images (``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, above what was
allocated before); the hungriest one (a gated model under ``bpda``/``sharp`` runs two networks, under ``eot``
``eot_samples`` draws) is then measured at doubling sizes until the next doubling would not fit. The peak grows
linearly with the batch (activations), so the two largest measurements give a fixed and a per-image cost, and the
batch is the largest whose predicted peak stays within :data:`MEMORY_SHARE` of the memory free when sizing began
(the rest is headroom for the allocator's fragmentation and the attacks' own buffers: PGD's best examples, APGD's
momentum, the records' norms). Rounded down to a multiple of :data:`ROUND` (whole warps; batch 2048 is how an
attack runs well on an H100), never above what a measurement or an out-of-memory error showed not to fit.

CPU: a fixed rule, no measurement: the data split into equal batches of at most :data:`CPU_MAX` images, their
count rounded up to a multiple of the processes sharing them (``workers``, or the ranks of ``torchrun``; on tiny
data the rounding can leave one process a batch short). On a CPU the cost
per image hardly falls past ~32-64 images (the convolutions are already large enough to keep the cores busy), so a
larger batch only costs memory (an EOT backward through ResNet-110 holds ``eot_samples`` graphs) and makes
progress and resume coarser; equal batches in a multiple of the processes leave no process idle at the end and no
small last batch.

Always: never more than ``n`` (the data), never below 1; under ``torchrun`` every rank takes the smallest size any
rank chose (shards are keyed by batch index, so all ranks must cut the data alike) and no more than ``n / world``
(each rank gets a batch). A resumed run reuses the batch size its manifest records: shards are keyed by batch
index, and a different size would mix samples of different batches.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch.nn import functional as F

from attacks.base import GRADIENT_FREE, Target
from attacks.runner.config import AttackConfig, dedupe
from attacks.runner.plan import EvalPlan
from models.network import CoarseFineNet
from robustness.data import CoarseFineDataset

#: the first batch size measured on CUDA (then doubled)
START = 32
#: share of the free CUDA memory a batch may take at its peak
MEMORY_SHARE = 0.8
#: CUDA batch sizes are multiples of this (when at least this large)
ROUND = 32
#: the largest CPU batch
CPU_MAX = 128

GIB = float(1 << 30)


@dataclass(frozen=True)
class Sizing:
    """The batch size a run uses, whether ``auto`` chose it, and how (the log line's parenthesis)."""

    size: int
    auto: bool
    how: str

    def log_line(self) -> str:
        return f"batch size auto: {self.size} ({self.how})"


# --------------------------------------------------------------------------------------------------------------
# The rules
# --------------------------------------------------------------------------------------------------------------


def cpu_batch_size(n: int, processes: int = 1, largest: int = CPU_MAX) -> int:
    """Equal batches of at most ``largest`` images, their count a multiple of ``processes`` (module docstring)."""
    n, processes = max(1, int(n)), max(1, int(processes))
    batches = processes * math.ceil(n / (processes * largest))
    return max(1, math.ceil(n / batches))


def fitting_batch_size(n: int, probe: Callable[[int], int], budget: float, start: int = START
                       ) -> tuple[int, int, int]:
    """The largest batch of at most ``n`` whose peak memory fits ``budget`` bytes, and the measurement it rests
    on: ``(size, peak bytes, at batch)``.

    ``probe(b)`` returns the peak bytes of one batch of ``b`` or raises ``torch.cuda.OutOfMemoryError``. Sizes
    double from ``start`` (halve after an OOM or an over-budget peak until one fits) until the predicted peak of
    the next doubling exceeds the budget, or ``n`` is reached; the two largest measurements fit
    ``peak = fixed + per_image * b`` (one measurement: a line through 0, which overstates larger peaks), from
    which the largest fitting batch is read. Never above a size that did not fit; after an out-of-memory error
    (the free memory reported was not there to take) no larger than the largest size measured to fit; 1 where
    nothing fits.
    """
    n = max(1, int(n))
    b = min(max(1, start), n)
    fits: list[tuple[int, int]] = []  # (batch, peak) measured within the budget
    too_big = n + 1  # the smallest batch seen not to fit
    out_of_memory = False

    def line() -> tuple[float, float]:  # (fixed, per image) through the two largest fitting measurements
        (b2, p2) = fits[-1]
        if len(fits) > 1 and p2 > fits[-2][1]:
            b1, p1 = fits[-2]
            per_image = (p2 - p1) / (b2 - b1)
            return max(0.0, p2 - per_image * b2), per_image
        return 0.0, p2 / b2

    while True:
        try:
            peak: int | None = int(probe(b))
        except torch.cuda.OutOfMemoryError:
            peak, out_of_memory = None, True
            _free_cache()
        if peak is None or peak > budget:
            too_big = min(too_big, b)
            if fits or b == 1:
                break
            b = max(1, b // 2)
            continue
        fits.append((b, peak))
        following = min(2 * b, n, too_big - 1)
        fixed, per_image = line()
        if following <= b or fixed + per_image * following > budget:
            break
        b = following
    if not fits:
        return 1, 0, 0
    fixed, per_image = line()
    size = int((budget - fixed) // per_image) if per_image > 0 else n
    at, peak = fits[-1]
    size = min(size, n, too_big - 1, at if out_of_memory else n)
    if size >= ROUND:
        size -= size % ROUND
    return max(size, at), peak, at


def _free_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------------------
# Measuring on CUDA
# --------------------------------------------------------------------------------------------------------------


def ways_to_run(plans: Sequence[EvalPlan], gated: bool) -> list[tuple[str, str, bool]]:
    """Each distinct ``(gate_mode, gate_grad, needs input gradient)`` among the white-box ``plans`` (transfer
    plans craft on the source model, which the runner passes)."""
    ways = [(p.gate_mode, p.gate_grad if gated else "none", p.attack.kind != GRADIENT_FREE) for p in plans]
    return dedupe(ways)


def peak_bytes(model: CoarseFineNet, data: CoarseFineDataset, size: int, head: str, way: tuple[str, str, bool],
               eot_samples: int, device: torch.device) -> int:
    """CUDA bytes one attack step of ``way`` takes on the first ``size`` samples of ``data`` at its peak, above
    what was allocated before: the forward of the crafting network(s) and, for a gradient attack, the backward to
    the input. Raises ``torch.cuda.OutOfMemoryError`` where it does not fit."""
    mode, grad, needs_grad = way
    x, fine, coarse = data.batch(slice(0, size))
    x, y = x.to(device), (fine if head == "fine" else coarse).to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    target = Target(model, head, mode, grad, eot_samples, device)
    if needs_grad:
        xr = x.clone().requires_grad_(True)
        loss = F.cross_entropy(target.forward(xr).logits(head), y)
        torch.autograd.grad(loss, xr)
        del xr, loss
    else:
        with torch.no_grad():
            target.forward(x)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del x, y
    _free_cache()
    return int(peak)


def cuda_sizing(model: CoarseFineNet, data: CoarseFineDataset, config: AttackConfig, plans: Sequence[EvalPlan],
                device: torch.device, limit: int) -> Sizing:
    """The largest batch of at most ``limit`` that fits this GPU (module docstring), with its log line."""
    model.eval()
    _free_cache()
    free, _ = torch.cuda.mem_get_info(device)
    budget = MEMORY_SHARE * free
    ways = ways_to_run(plans, model.is_gated)

    def probe(way: tuple[str, str, bool]) -> Callable[[int], int]:
        return lambda b: peak_bytes(model, data, b, config.target, way, config.eot_samples, device)

    first = min(START, limit)
    peaks: dict[tuple[str, str, bool], float] = {}
    for way in ways:  # the hungriest way, measured at the first size (an OOM there: hungry enough)
        try:
            peaks[way] = probe(way)(first)
        except torch.cuda.OutOfMemoryError:
            _free_cache()
            peaks[way] = math.inf
    hungriest = max(ways, key=lambda w: peaks[w])
    size, peak, at = fitting_batch_size(limit, probe(hungriest), budget, start=first)
    mode, grad, needs_grad = hungriest
    return Sizing(size, True, f"cuda, peak {peak / GIB:.1f} GiB at {at} under {mode}/{grad}"
                              f"{'' if needs_grad else ' (forward only)'}; {MEMORY_SHARE:.0%} of "
                              f"{free / GIB:.1f} GiB free")


# --------------------------------------------------------------------------------------------------------------
# The run's batch size
# --------------------------------------------------------------------------------------------------------------


def resolve_batch_size(config: AttackConfig, plans: Sequence[EvalPlan], model: CoarseFineNet,
                       data: CoarseFineDataset, device: torch.device, *, world: int = 1,
                       previous: dict[str, Any] | None = None,
                       agree: Callable[[int], int] = lambda size: size) -> Sizing:
    """The batch size of this run: ``config.batch_size`` when it is a number; for ``auto`` the batch size of
    ``previous`` (the manifest of the records being resumed) when it has one, else the device's rule (module
    docstring). ``model`` is the crafting model (the one differentiated), ``world`` the processes sharing the
    batches (``workers`` or the torchrun world), ``agree`` makes every rank take the same size (the smallest)."""
    if not config.batch_auto:
        return Sizing(int(config.batch_size), False, "given")
    made_with = (previous or {}).get("batch_size")
    if isinstance(made_with, int) and not isinstance(made_with, bool) and made_with > 0:
        return Sizing(made_with, True, "the manifest's: the records being resumed were made with it")
    n = len(data)
    limit = max(1, math.ceil(n / max(1, world)))
    if device.type == "cuda":
        sizing = cuda_sizing(model, data, config, plans, device, limit)
    else:
        size = cpu_batch_size(n, world)
        sizing = Sizing(size, True, f"cpu: {math.ceil(n / size)} equal batch(es) of at most {CPU_MAX} for "
                                    f"{world} process(es)")
    agreed = max(1, min(agree(sizing.size), n))
    if agreed != sizing.size:
        sizing = Sizing(agreed, True, f"{sizing.how}; the smallest over the ranks")
    return sizing
