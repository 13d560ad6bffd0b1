"""Throughput of real layer skipping against masked execution, the open network, the static twins and the physical
limit (``dsn-robust bench``); the attack runner's overhead comes from :mod:`robustness.bench.overhead`.

Two yardsticks for sub-batch skipping, at each batch size (1: how a dynamic network is deployed; 256; 2048: how an
attack runs on a GPU):

- *MACs*: time saved against masked execution (same decisions, every block computed and multiplied by its gate)
  over MACs saved (``efficiency``). MACs ignore launch overhead and the gates' own work, so this can look bad for
  reasons skipping cannot fix, or good for reasons unrelated to it.
- *the ideal*: each gated block is timed alone on the input it receives in the open network (captured with forward
  hooks); with ``r_k`` the share of samples the hard forward skips at block ``k``, skipping can at best save
  ``ideal_saving_s = sum_k t_k * r_k`` of the open forward. ``achieved_of_ideal = (t_open - t_hard) / ideal``
  (target >= 0.8). The ideal holds per-block cost linear in the batch: at batch 1 every ``r_k`` is 0 or 1, at
  large batches a sub-batch of half the samples may cost more than half (smaller kernels are less efficient).

Timing method: the variants are interleaved (round-robin, order alternating between rounds) after one warm-up call
each, so slow drift of a shared machine hits all of them alike; per variant the minimum, the median and the spread
(max / min) are reported, and every ratio uses the minimum (the least disturbed by other load). On CUDA every timed
call is bracketed by ``torch.cuda.synchronize``. Operator counts (:mod:`robustness.bench.profile`) come from one
extra profiled forward per variant, outside the timed calls.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch

from attacks.runner import load_run_checkpoint
from models.network import CoarseFineNet
from models.registry import create_model, model_options
from robustness.bench.overhead import measure_overhead, sync
from robustness.bench.profile import count_ops
from robustness.core.errors import ConfigError
from robustness.core.rundir import RunDir

HARD, MASKED, OPEN, DUAL, RESNET = "dsn hard (sub-batch)", "dsn masked", "dsn open", "dual", "resnet"
#: the targets, checked per batch size (benchmark numbers, never timed tests)
MAX_OPEN_VS_DUAL = 1.3
MIN_ACHIEVED_OF_IDEAL = 0.8
#: --batch-size without a value: batch 2048 takes minutes per variant on a 2-core CPU, so only on CUDA
DEFAULT_BATCH_SIZES = {"cuda": (1, 256, 2048), "cpu": (1, 256)}


@dataclass(frozen=True)
class Timing:
    """One variant at one batch size: seconds per batch (min, median, spread = max / min) and dispatched work."""

    variant: str
    seconds_min: float
    seconds_median: float
    spread: float
    images_per_s: float  # batch / seconds_min
    macs_per_image: float
    macs_ratio: float  # MACs per image relative to the dsn open network
    time_ratio: float  # seconds_min relative to dsn masked execution
    aten_ops: int
    aten_top: int
    kernels: int | None
    host_syncs: int
    d2h_copies: int | None


@dataclass(frozen=True)
class IdealSaving:
    """The physical limit of sub-batch skipping (module docstring). Gated blocks in path order (``gate_names``)."""

    block_seconds: list[float]  # t_k: each gated block alone on its full-batch open-network input (min of repeats)
    skip_share: list[float]  # r_k: share of the samples the hard forward skips at block k
    ideal_saving_s: float  # sum_k t_k * r_k
    ideal_fraction: float | None  # ideal_saving_s / t_open
    achieved_saving_s: float  # t_open - t_hard
    achieved_of_ideal: float | None  # achieved / ideal; None when the ideal is 0 (nothing skipped)


@dataclass(frozen=True)
class BatchBench:
    """Every figure at one batch size."""

    batch_size: int
    skip: float  # fraction of gated blocks skipped by the hard gates (mean over samples and gates)
    macs_saving: float  # 1 - hard MACs / open MACs
    time_saving: float  # 1 - hard time / masked time
    efficiency: float | None  # time_saving / macs_saving; None when nothing is saved
    ideal: IdealSaving
    open_vs_dual_time: float
    open_vs_dual_aten_ops: float
    open_vs_dual_aten_top: float
    hard_vs_masked_time: float
    targets: dict[str, bool | None]  # each issue-12 target and whether it is met (None: not defined here)
    timings: list[Timing]


@dataclass(frozen=True)
class BenchResult:
    """One :class:`BatchBench` per requested batch size, plus what was measured and the attack overhead."""

    device: str
    source: str
    model: dict
    repeats: int
    batches: list[BatchBench]
    attack_overhead: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# -- parsing ---------------------------------------------------------------------------------------------------
def parse_batch_sizes(text: str | None, device: torch.device) -> tuple[int, ...]:
    """``"1,256,2048"`` -> (1, 256, 2048); None -> the device's default (:data:`DEFAULT_BATCH_SIZES`)."""
    if text is None:
        return DEFAULT_BATCH_SIZES["cuda" if device.type == "cuda" else "cpu"]
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ConfigError(f"--batch-size needs a comma list of positive integers, got {text!r}")
    sizes = []
    for part in parts:
        try:
            size = int(part)
        except ValueError:
            raise ConfigError(f"--batch-size needs positive integers, got {part!r}") from None
        if size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {size}")
        sizes.append(size)
    return tuple(dict.fromkeys(sizes))


# -- timing ----------------------------------------------------------------------------------------------------
def time_interleaved(fns: dict[str, Callable[[], object]], repeats: int,
                     device: torch.device) -> dict[str, list[float]]:
    """Seconds of each ``fns[name]()`` over ``repeats`` rounds, round-robin in an order that alternates between
    rounds, after one warm-up call each (no gradients)."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    with torch.no_grad():
        for name in names:
            fns[name]()
        sync(device)
        for r in range(repeats):
            for name in names if r % 2 == 0 else reversed(names):
                sync(device)
                start = time.perf_counter()
                fns[name]()
                sync(device)
                samples[name].append(time.perf_counter() - start)
    return samples


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def ideal_saving(block_seconds: Sequence[float], skip_share: Sequence[float], t_open: float,
                 t_hard: float) -> IdealSaving:
    """The ideal saving ``sum_k t_k r_k`` and the achieved share of it (see the module docstring)."""
    if len(block_seconds) != len(skip_share):
        raise ValueError(f"{len(block_seconds)} block times for {len(skip_share)} skip shares")
    ideal = float(sum(t * r for t, r in zip(block_seconds, skip_share)))
    achieved = t_open - t_hard
    return IdealSaving(block_seconds=[float(t) for t in block_seconds], skip_share=[float(r) for r in skip_share],
                       ideal_saving_s=ideal, ideal_fraction=_ratio(ideal, t_open), achieved_saving_s=achieved,
                       achieved_of_ideal=_ratio(achieved, ideal))


def gated_block_inputs(dsn: CoarseFineNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Each gated block's input in one open forward of ``x``, in path order (``dsn.gate_names``)."""
    blocks = dsn.coarse.gated_blocks() + dsn.fine.gated_blocks()
    captured: dict[int, torch.Tensor] = {}

    def recorder(k: int):
        def hook(module, inputs) -> None:
            captured[k] = inputs[0].detach()
        return hook

    handles = [block.register_forward_pre_hook(recorder(k)) for k, block in enumerate(blocks)]
    try:
        with torch.no_grad():
            dsn(x, mode="open", execution="subbatch")
    finally:
        for handle in handles:
            handle.remove()
    if len(captured) != len(blocks) or len(blocks) != dsn.n_gates:
        raise RuntimeError(f"captured {len(captured)} of {len(blocks)} gated blocks ({dsn.n_gates} gates)")
    return [captured[k] for k in range(len(blocks))]


# -- the benchmark ---------------------------------------------------------------------------------------------
def _models(run: str | None, skip: float | None, depth_n: int, width: int, image_size: int,
            device: torch.device) -> tuple[CoarseFineNet, dict, str]:
    """The dsn to time, the options for its static twins, and a description of where its gates come from."""
    if run is not None:
        ckpt = load_run_checkpoint(RunDir.at(run))
        if ckpt.model_name != "dsn":
            raise ConfigError(f"bench --run needs a dsn run; {run} holds a {ckpt.model_name!r} model")
        return ckpt.build_model(device), dict(ckpt.model_config), f"trained gates of {run}"
    options = dict(num_fine=100, num_coarse=20, depth_n=depth_n, width=width, image_size=image_size)
    model = create_model("dsn", **options).to(device).eval()
    model.gate_rate.fill_(1.0 - skip)
    return model, options, f"untrained dsn, gates forced to skip {skip:.0%} at random per sample"


def _check(run: str | None, skip: float | None, repeats: int, depth_n: int, width: int, image_size: int) -> None:
    if run is None and not (skip is not None and 0.0 <= skip <= 1.0):
        raise ConfigError(f"--skip must be in [0, 1], got {skip}")
    if repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {repeats}")
    if run is None and (depth_n < 2 or width < 1 or image_size < 1):
        raise ConfigError(f"--depth-n must be >= 2, --width and --image-size >= 1; got depth-n {depth_n}, "
                          f"width {width}, image-size {image_size}")


def _bench_batch(dsn: CoarseFineNet, twins: dict[str, CoarseFineNet], x: torch.Tensor, mode: str, seed: int,
                 repeats: int, device: torch.device) -> BatchBench:
    batch = x.shape[0]

    def dsn_in(execution: str, forward_mode: str = mode) -> Callable[[], object]:
        def call() -> object:
            torch.manual_seed(seed)  # the same random decisions for sub-batch and masked execution
            return dsn(x, mode=forward_mode, execution=execution)
        return call

    with torch.no_grad():
        hard = dsn_in("subbatch")()
    hard_macs = float(hard.macs.mean())
    variants: dict[str, tuple[Callable[[], object], float]] = {
        HARD: (dsn_in("subbatch"), hard_macs),
        MASKED: (dsn_in("mask"), hard_macs),
        OPEN: (dsn_in("subbatch", "open"), dsn.full_macs),
        DUAL: (lambda: twins[DUAL](x), twins[DUAL].full_macs),
        RESNET: (lambda: twins[RESNET](x), twins[RESNET].full_macs),
    }
    samples = time_interleaved({name: fn for name, (fn, _) in variants.items()}, repeats, device)
    best = {name: min(s) for name, s in samples.items()}
    with torch.no_grad():
        ops = {name: count_ops(fn, cuda=device.type == "cuda") for name, (fn, _) in variants.items()}
    timings = [Timing(variant=name, seconds_min=best[name], seconds_median=statistics.median(samples[name]),
                      spread=max(samples[name]) / best[name], images_per_s=batch / best[name],
                      macs_per_image=macs, macs_ratio=macs / dsn.full_macs, time_ratio=best[name] / best[MASKED],
                      **ops[name].to_dict())
               for name, (_, macs) in variants.items()]

    inputs = gated_block_inputs(dsn, x)
    blocks = dsn.coarse.gated_blocks() + dsn.fine.gated_blocks()
    block_samples = time_interleaved({str(k): (lambda b=b, i=i: b(i)) for k, (b, i) in enumerate(zip(blocks, inputs))},
                                     repeats, device)
    skip_share = (1.0 - hard.path.float().mean(0)).tolist()
    ideal = ideal_saving([min(block_samples[str(k)]) for k in range(len(blocks))], skip_share, best[OPEN], best[HARD])
    del inputs

    macs_saving = 1.0 - hard_macs / dsn.full_macs
    time_saving = 1.0 - best[HARD] / best[MASKED]
    open_vs_dual_time = best[OPEN] / best[DUAL]
    open_vs_dual_ops = ops[OPEN].aten_ops / max(ops[DUAL].aten_ops, 1)
    hard_vs_masked = best[HARD] / best[MASKED]
    targets = {
        f"open_vs_dual_time <= {MAX_OPEN_VS_DUAL}": open_vs_dual_time <= MAX_OPEN_VS_DUAL,
        f"open_vs_dual_aten_ops <= {MAX_OPEN_VS_DUAL}": open_vs_dual_ops <= MAX_OPEN_VS_DUAL,
        f"achieved_of_ideal >= {MIN_ACHIEVED_OF_IDEAL}": None if ideal.achieved_of_ideal is None
        else ideal.achieved_of_ideal >= MIN_ACHIEVED_OF_IDEAL,
        "hard_vs_masked_time < 1": hard_vs_masked < 1.0,
    }
    return BatchBench(batch_size=batch, skip=1.0 - float(hard.path.float().mean()) if hard.path.numel() else 0.0,
                      macs_saving=macs_saving, time_saving=time_saving,
                      efficiency=time_saving / macs_saving if macs_saving > 0 else None, ideal=ideal,
                      open_vs_dual_time=open_vs_dual_time, open_vs_dual_aten_ops=open_vs_dual_ops,
                      open_vs_dual_aten_top=ops[OPEN].aten_top / max(ops[DUAL].aten_top, 1),
                      hard_vs_masked_time=hard_vs_masked, targets=targets, timings=timings)


def run_benchmark(run: str | None = None, skip: float | None = 0.5, batch_sizes: Sequence[int] = (1, 256),
                  repeats: int = 5, depth_n: int = 3, width: int = 16, image_size: int = 32,
                  device: torch.device | None = None, seed: int = 0, attack_overhead: bool = True) -> BenchResult:
    """Every figure at each of ``batch_sizes``, on one fixed batch of random images per size (``run``: a trained
    dsn in hard mode; else an untrained one whose gates skip a random ``skip`` share per sample and block)."""
    device = device or torch.device("cpu")
    _check(run, skip, repeats, depth_n, width, image_size)
    if not batch_sizes or min(batch_sizes) < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {','.join(map(str, batch_sizes)) or 'nothing'}")
    dsn, options, source = _models(run, skip, depth_n, width, image_size, device)
    # a trained dsn's options include gate settings the static twins do not take
    twins = {name: create_model(name, **{k: v for k, v in options.items() if k in model_options(name)})
             .to(device).eval() for name in (DUAL, RESNET)}
    size, channels = dsn.config["image_size"], dsn.config["in_channels"]
    mode = "hard" if run is not None else "random"
    batches = []
    for batch_size in batch_sizes:
        x = torch.rand(batch_size, channels, size, size, generator=torch.Generator().manual_seed(seed)).to(device)
        batches.append(_bench_batch(dsn, twins, x, mode, seed, repeats, device))
        del x
    overhead = None
    if attack_overhead:
        generator = torch.Generator().manual_seed(seed)
        x = torch.rand(64, channels, size, size, generator=generator).to(device)
        labels = torch.randint(0, dsn.config["num_fine"], (64,), generator=generator).to(device)
        overhead = measure_overhead(dsn, x, labels, eps=8 / 255, steps=10, repeats=max(1, repeats // 2))
    model = dict(depth_n=dsn.config["depth_n"], width=dsn.config["width"], image_size=size, n_gates=dsn.n_gates,
                 full_macs=dsn.full_macs)
    return BenchResult(device=str(device), source=source, model=model, repeats=repeats, batches=batches,
                       attack_overhead=overhead)


# -- output ----------------------------------------------------------------------------------------------------
def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def _yes(met: bool | None) -> str:
    return "n/a" if met is None else "yes" if met else "NO"


def format_batch(b: BatchBench) -> str:
    """One compact table for one batch size, the ideal-saving line and the targets line."""
    lines = [f"batch {b.batch_size}",
             f"{'variant':<21}{'min ms':>9}{'med ms':>9}{'spread':>7}{'img/s':>10}{'MACs':>6}{'time':>6}"
             f"{'aten':>6}{'top':>5}{'kern':>6}{'sync':>5}"]
    for t in b.timings:
        lines.append(f"{t.variant:<21}{t.seconds_min * 1e3:>9.2f}{t.seconds_median * 1e3:>9.2f}{t.spread:>7.2f}"
                     f"{t.images_per_s:>10.0f}{t.macs_ratio:>6.2f}{t.time_ratio:>6.2f}{t.aten_ops:>6}{t.aten_top:>5}"
                     f"{'-' if t.kernels is None else t.kernels:>6}{t.host_syncs:>5}")
    i = b.ideal
    lines.append(f"skip {b.skip:.1%}: MACs saved {b.macs_saving:.1%}, time saved vs masked {b.time_saving:.1%} "
                 f"(efficiency {_fmt(b.efficiency)}); ideal saving {i.ideal_saving_s * 1e3:.2f} ms "
                 f"({_fmt(i.ideal_fraction, '.1%')} of open), achieved {i.achieved_saving_s * 1e3:.2f} ms "
                 f"= {_fmt(i.achieved_of_ideal)} of ideal")
    lines.append(f"targets: open/dual time {b.open_vs_dual_time:.2f} (<= {MAX_OPEN_VS_DUAL}: "
                 f"{_yes(b.targets[f'open_vs_dual_time <= {MAX_OPEN_VS_DUAL}'])}), open/dual aten ops "
                 f"{b.open_vs_dual_aten_ops:.2f} ({_yes(b.targets[f'open_vs_dual_aten_ops <= {MAX_OPEN_VS_DUAL}'])}),"
                 f" achieved/ideal {_fmt(i.achieved_of_ideal)} (>= {MIN_ACHIEVED_OF_IDEAL}: "
                 f"{_yes(b.targets[f'achieved_of_ideal >= {MIN_ACHIEVED_OF_IDEAL}'])}), hard/masked time "
                 f"{b.hard_vs_masked_time:.2f} (< 1: {_yes(b.targets['hard_vs_masked_time < 1'])})")
    return "\n".join(lines)


def format_table(result: BenchResult) -> str:
    """One table per batch size (min and median ms per batch, MACs and time ratios vs open / masked, aten ops,
    top-level aten ops, CUDA kernels, host syncs), then the attack overhead."""
    m = result.model
    lines = [f"{result.device}: dsn depth_n {m['depth_n']} width {m['width']} ({m['n_gates']} gates), "
             f"{result.source}; min of {result.repeats} interleaved repeats"]
    lines += [format_batch(b) for b in result.batches]
    if result.attack_overhead:
        o = result.attack_overhead
        lines.append(f"attack overhead: suite {o['seconds_suite']:.3f}s vs direct torchattacks PGD "
                     f"{o['seconds_direct']:.3f}s -> ratio {o['ratio']:.3f} (target <= 1.10)")
    return "\n".join(lines)
