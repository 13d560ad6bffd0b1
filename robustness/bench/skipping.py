"""Throughput of real layer skipping against masked execution, the open network and the static twins
(``dsn-robust bench``); the attack runner's overhead comes from :mod:`robustness.bench.overhead`.

The number that matters: the wall-clock saving of sub-batch execution relative to masked execution (same
decisions, every block computed and multiplied by its gate) should be at least 80% of the MACs saving.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from attacks.runner import load_run_checkpoint
from models.network import CoarseFineNet
from models.registry import create_model
from robustness.bench.overhead import measure_overhead
from robustness.core.errors import ConfigError
from robustness.core.rundir import RunDir


@dataclass(frozen=True)
class Timing:
    """One configuration's measured throughput."""

    variant: str
    images_per_s: float
    seconds_per_batch: float
    macs_per_image: float
    macs_ratio: float  # MACs per image relative to the dsn open network
    time_ratio: float  # seconds per batch relative to dsn masked execution


@dataclass(frozen=True)
class BenchResult:
    device: str
    batch_size: int
    source: str
    skip: float  # fraction of gated blocks skipped by the hard gates
    macs_saving: float  # 1 - hard MACs / open MACs
    time_saving: float  # 1 - hard time / masked time
    efficiency: float  # time_saving / macs_saving; target >= 0.8
    timings: list[Timing]
    attack_overhead: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def _time(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up run."""
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    with torch.no_grad():
        fn()
        sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            sync()
            samples.append(time.perf_counter() - start)
    return sorted(samples)[len(samples) // 2]


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


def run_benchmark(run: str | None = None, skip: float | None = 0.5, batch_size: int = 256, repeats: int = 5,
                  depth_n: int = 3, width: int = 16, image_size: int = 32, device: torch.device | None = None,
                  seed: int = 0, attack_overhead: bool = True) -> BenchResult:
    """Time every variant on one fixed batch of random images (``run``: a trained dsn; else ``skip``)."""
    device = device or torch.device("cpu")
    if run is None and not (skip is not None and 0.0 <= skip <= 1.0):
        raise ConfigError("--skip must be in [0, 1]")
    if batch_size < 1 or repeats < 1:
        raise ConfigError("--batch-size and --repeats must be >= 1")
    dsn, options, source = _models(run, skip, depth_n, width, image_size, device)
    size = dsn.config["image_size"]
    x = torch.rand(batch_size, dsn.config["in_channels"], size, size,
                   generator=torch.Generator().manual_seed(seed)).to(device)
    mode = "hard" if run is not None else "random"

    def dsn_in(execution: str, forward_mode: str = mode) -> Callable[[], object]:
        def call() -> object:
            torch.manual_seed(seed)  # the same random decisions for sub-batch and masked execution
            return dsn(x, mode=forward_mode, execution=execution)
        return call

    with torch.no_grad():
        hard = dsn_in("subbatch")()
    twins = {name: create_model(name, **options).to(device).eval() for name in ("dual", "resnet")}
    variants: dict[str, tuple[Callable[[], object], float]] = {
        "dsn hard (sub-batch)": (dsn_in("subbatch"), float(hard.macs.mean())),
        "dsn masked": (dsn_in("mask"), float(hard.macs.mean())),
        "dsn open": (dsn_in("subbatch", "open"), dsn.full_macs),
        "dual": (lambda: twins["dual"](x), twins["dual"].full_macs),
        "resnet": (lambda: twins["resnet"](x), twins["resnet"].full_macs),
    }
    seconds = {name: _time(fn, repeats, device) for name, (fn, _) in variants.items()}
    masked = seconds["dsn masked"]
    timings = [Timing(name, batch_size / seconds[name], seconds[name], macs, macs / dsn.full_macs,
                      seconds[name] / masked) for name, (_, macs) in variants.items()]
    macs_saving = 1.0 - float(hard.macs.mean()) / dsn.full_macs
    time_saving = 1.0 - seconds["dsn hard (sub-batch)"] / masked
    overhead = None
    if attack_overhead:
        labels = torch.randint(0, dsn.config["num_fine"], (min(batch_size, 64),),
                               generator=torch.Generator().manual_seed(seed)).to(device)
        overhead = measure_overhead(dsn, x[: len(labels)], labels, eps=8 / 255, steps=10, repeats=max(1, repeats // 2))
    return BenchResult(device=str(device), batch_size=batch_size, source=source,
                       skip=1.0 - float(hard.path.mean()) if hard.path.numel() else 0.0,
                       macs_saving=macs_saving, time_saving=time_saving,
                       efficiency=time_saving / macs_saving if macs_saving > 0 else float("nan"),
                       timings=timings, attack_overhead=overhead)


def format_table(result: BenchResult) -> str:
    """A small fixed-width table of the timings."""
    lines = [f"{'variant':<22}{'img/s':>10}{'s/batch':>10}{'MACs/img':>12}{'MACs ratio':>12}{'time ratio':>12}"]
    for t in result.timings:
        lines.append(f"{t.variant:<22}{t.images_per_s:>10.1f}{t.seconds_per_batch:>10.4f}"
                     f"{t.macs_per_image / 1e6:>11.2f}M{t.macs_ratio:>12.3f}{t.time_ratio:>12.3f}")
    lines.append(f"skip {result.skip:.1%} of gated blocks -> MACs saved {result.macs_saving:.1%}, time saved vs masked "
                 f"{result.time_saving:.1%}: efficiency {result.efficiency:.2f} (target >= 0.80)")
    if result.attack_overhead:
        o = result.attack_overhead
        lines.append(f"attack overhead: suite {o['seconds_suite']:.3f}s vs direct torchattacks PGD "
                     f"{o['seconds_direct']:.3f}s -> ratio {o['ratio']:.3f} (target <= 1.10)")
    return "\n".join(lines)
