"""The process around a computation: device choice, seeding, the distributed context, versions, JSON safety.

One owner each, so that no module hard-codes ``.cuda()``, derives seeds its own way, joins a process group
differently or writes NaN into a JSON file.
"""
from __future__ import annotations

import hashlib
import math
import os
import platform
import random
from contextlib import contextmanager
from dataclasses import dataclass, fields, is_dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from robustness.core.errors import ConfigError

DEVICE_CHOICES = ("auto", "cpu", "cuda")


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when available; asking for ``cuda`` on a machine without it is a ConfigError."""
    if not isinstance(name, str):
        raise ConfigError(f"device must be a string such as auto, cpu or cuda, got {name!r}")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine (use --device cpu or auto)")
        return torch.device(name)
    if name == "cpu":
        return torch.device("cpu")
    raise ConfigError(f"unknown device {name!r}; choose one of: {', '.join(DEVICE_CHOICES)}")


def seed_everything(seed: int) -> None:
    """Seed Python's and torch's generators (CPU and every CUDA device) from one recorded seed."""
    random.seed(seed)
    torch.manual_seed(seed)


def derive_seed(seed: int, *parts: Any) -> int:
    """A seed determined by ``seed`` and ``parts``, stable across processes, machines and runs.

    Integer-only parts (the trainer's ``(seed, epoch, rank, stream)``) are mixed arithmetically into [0, 2**63);
    parts that name things (an evaluation id, ``"clean"``, a gate mode) are hashed with SHA-256 into [0, 2**31).
    Both mixes are kept exactly as earlier versions computed them, so a run started before an upgrade resumes
    with the same data order and the same attack randomness.
    """
    if all(isinstance(p, int) and not isinstance(p, bool) for p in (seed, *parts)):
        value = 0x9E3779B97F4A7C15
        for p in (seed, *parts):
            value = (value * 6364136223846793005 + int(p) + 1442695040888963407) % (1 << 63)
        return value
    text = "|".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") % (2 ** 31)


# --------------------------------------------------------------------------------------------------------------
# Distributed context (torchrun)
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Distributed:
    """This process's place in a ``torchrun`` job (a single process: rank 0 of 1)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes files and prints."""
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        """Sum ``t`` over ranks in place (a no-op for one process)."""
        if self.enabled:
            torch.distributed.all_reduce(t)
        return t


def env_world() -> tuple[int, int, int]:
    """``(WORLD_SIZE, RANK, LOCAL_RANK)`` as ``torchrun`` sets them; ``(1, 0, 0)`` outside it."""
    try:
        return (int(os.environ.get("WORLD_SIZE", "1") or 1), int(os.environ.get("RANK", "0") or 0),
                int(os.environ.get("LOCAL_RANK", "0") or 0))
    except ValueError:
        raise ConfigError("WORLD_SIZE / RANK / LOCAL_RANK must be integers (set by torchrun)") from None


def process_device(device: torch.device) -> torch.device:
    """The device this process uses: under ``torchrun`` on CUDA, the GPU of its local rank."""
    world, _, local_rank = env_world()
    if world > 1 and device.type == "cuda":
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return device


@contextmanager
def distributed(device: torch.device) -> Iterator[Distributed]:
    """Join the process group that ``torchrun`` describes (WORLD_SIZE > 1), and leave it at the end.

    NCCL on CUDA, gloo on CPU. A group that already exists is used and left alone.
    """
    world, _, local_rank = env_world()
    if world <= 1:
        yield Distributed()
        return
    dist = torch.distributed
    owns = not dist.is_initialized()
    if owns:
        if device.type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    try:
        yield Distributed(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank)
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------------------
# Versions and JSON
# --------------------------------------------------------------------------------------------------------------


def package_versions() -> dict[str, str]:
    """Versions of the packages whose behaviour a result depends on."""
    versions = {"python": platform.python_version()}
    for pkg in ("dsn-robustness", "torch", "torchvision", "torchattacks", "foolbox", "numpy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    return versions


def jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON values: NaN/NA -> null, infinities -> "inf"/"-inf", numpy scalars and arrays -> Python,
    tuples and sets -> lists, DataFrames -> lists of row objects, objects with ``as_dict()`` and dataclasses ->
    objects, paths and anything else -> strings."""
    if hasattr(obj, "to_dict") and hasattr(obj, "columns"):  # a pandas DataFrame
        return [jsonable(r) for r in obj.to_dict(orient="records")]
    if callable(getattr(obj, "as_dict", None)):
        return jsonable(obj.as_dict())
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset, np.ndarray)):
        return [jsonable(v) for v in obj]
    if obj is None or type(obj).__name__ == "NAType":
        return None
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        x = float(obj)
        return None if math.isnan(x) else ("inf" if x == math.inf else "-inf" if x == -math.inf else x)
    if isinstance(obj, Path):
        return str(obj)
    return obj if isinstance(obj, str) else str(obj)


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's CPU thread count set to ``threads`` for the duration (0: leave torch's default), then restored.
    On a busy small CPU, 1 thread is many times faster for small models than torch's default."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
