"""The process around a computation: device choice, seeding, the distributed context, versions, JSON safety,
float32 precision and the memory a job may still take (stopping on SIGTERM is
:mod:`robustness.core.signals`'s).

One owner each, so that no module hard-codes ``.cuda()``, derives seeds its own way, joins a process group
differently, writes NaN into a JSON file or flips a global TF32 flag.

TF32: PyTorch lets cuDNN convolutions use TensorFloat-32 by default, and the matmul precision is a process-wide
setting too, so without :func:`true_float32` attack records would depend on flags nobody set (on an H200 the
sub-batch and masked outputs of a ResNet-110-sized dsn differ by 4e-4 relative with TF32, 1.5e-6 without).
Pitfall: since torch 2.9 the legacy flags (``torch.backends.cuda.matmul.allow_tf32``, ``cudnn.allow_tf32``,
``torch.get_float32_matmul_precision()``) raise a RuntimeError when *read* after the newer per-backend API
(``torch.backends.*.fp32_precision``) set a state they cannot express; and writing ``allow_tf32`` after a
``"medium"`` precision produces such a state. So the legacy state is read once, restored through the matmul
precision (which implies ``matmul.allow_tf32``) and ``cudnn.allow_tf32`` only, and where it cannot be read the
per-backend precisions are saved and restored instead.
"""
from __future__ import annotations

import hashlib
import logging
import math
import os
import random
import socket
from contextlib import contextmanager, suppress
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch

from robustness.core.errors import ConfigError
from robustness.core.signals import stop_on_termination
from robustness.core.versions import PACKAGE, package_version, package_versions  # noqa: F401 (re-exported)

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


def generator_kept(x: torch.Tensor) -> Any:
    """A context in which torch's generators for ``x``'s device (CPU, and its CUDA device) may draw: they are
    restored afterwards, so draws made there (a measurement, a check) do not shift the draws that follow."""
    return torch.random.fork_rng(devices=[x.device.index or 0] if x.is_cuda else [])


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

    def all_min(self, value: int) -> int:
        """The smallest ``value`` over ranks (what every rank can afford); ``value`` itself for one process."""
        if not self.enabled:
            return value
        on_gpu = torch.distributed.get_backend() == "nccl"  # NCCL reduces CUDA tensors only
        t = torch.tensor([value], dtype=torch.int64,
                         device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else "cpu")
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
        return int(t.item())


def accumulation_dtype(device: torch.device) -> torch.dtype:
    """The dtype for sums that must stay exact on ``device`` (per-sample MACs ~1e8, a training epoch's loss
    sums): float64, or float32 on MPS, which has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now: the rendezvous of processes this machine spawns itself."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def join_as_rank(rank: int, world: int, port: int, log_level: int) -> None:
    """Set the environment ``torchrun`` would give rank ``rank`` of ``world`` processes on this machine, and the
    process's logging: ``log_level`` on rank 0, warnings only on the others (the parent has already said what is
    planned; rank 0 reports the progress)."""
    logging.basicConfig(level=log_level if rank == 0 else max(log_level, logging.WARNING), format="%(message)s")
    stop_on_termination()  # a worker of the job stops as its parent does (robustness.core.signals)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))


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


# --------------------------------------------------------------------------------------------------------------
# Float32 precision (TF32)
# --------------------------------------------------------------------------------------------------------------

#: the per-backend precisions of torch >= 2.9 that TF32 can reach, and the matmul one in legacy terms
_PRECISION_BACKENDS = ("cuda.matmul", "cudnn.conv", "cudnn.rnn")
_LEGACY_MATMUL = {"ieee": "highest", "tf32": "high", "bf16": "medium"}


def _legacy_flags() -> tuple[str, bool] | None:
    """``(matmul precision, cudnn.allow_tf32)`` as the legacy API reports them; None where torch refuses to read
    them because the per-backend API set a state they cannot express."""
    try:
        return torch.get_float32_matmul_precision(), bool(torch.backends.cudnn.allow_tf32)
    except RuntimeError:
        return None


def _precision_backends() -> Sequence[Any]:
    """The backend objects with an ``fp32_precision`` (torch >= 2.9); empty on older torch."""
    found = []
    for path in _PRECISION_BACKENDS:
        obj: Any = torch.backends
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if obj is None or not hasattr(obj, "fp32_precision"):
            return []
        found.append(obj)
    return found


def float32_state() -> dict[str, Any]:
    """The float32 arithmetic in force: ``{"tf32": reduced precision allowed anywhere (cuBLAS or cuDNN),
    "matmul_precision": "highest" | "high" | "medium"}`` (what attack manifests record)."""
    legacy = _legacy_flags()
    if legacy is not None:
        precision, cudnn = legacy
        return {"tf32": precision != "highest" or cudnn, "matmul_precision": precision}
    values = [b.fp32_precision for b in _precision_backends()]
    if not values:
        return {"tf32": True, "matmul_precision": "unknown"}
    matmul = values[0] if values[0] != "none" else getattr(torch.backends, "fp32_precision", "none")
    return {"tf32": any(v != "ieee" for v in values),  # "none" inherits: cuDNN's default is TF32
            "matmul_precision": _LEGACY_MATMUL.get(matmul, "highest" if matmul == "none" else matmul)}


@contextmanager
def true_float32() -> Iterator[None]:
    """Exact float32 matmuls and convolutions (TF32 off for cuBLAS and cuDNN, matmul precision ``highest``) for
    the duration; the flags as they were afterwards, also after an error. Harmless on CPU. See the module
    docstring for why the legacy flags are written the way they are."""
    legacy = _legacy_flags()
    backends = _precision_backends() if legacy is None else []
    saved = [b.fp32_precision for b in backends]
    try:
        if legacy is not None:
            torch.set_float32_matmul_precision("highest")  # also turns matmul.allow_tf32 off
            torch.backends.cudnn.allow_tf32 = False
        for b in backends:
            b.fp32_precision = "ieee"
        yield
    finally:
        if legacy is not None:
            torch.set_float32_matmul_precision(legacy[0])
            torch.backends.cudnn.allow_tf32 = legacy[1]
        for b, value in zip(backends, saved):
            b.fp32_precision = value


# --------------------------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------------------------


def available_memory() -> int | None:
    """Bytes this process can still allocate without swapping or being killed: the kernel's ``MemAvailable`` (free
    memory plus the page cache it can give back; else the free pages, ``SC_AVPHYS_PAGES``), lowered to what the
    cgroup's limit leaves (a container's ``memory.max``); None where none of them can be read."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
                break
    except (OSError, ValueError, IndexError):
        pass
    if not found:
        with suppress(AttributeError, OSError, ValueError):
            found.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    left = _cgroup_memory_left()
    if left is not None:
        found.append(left)
    return min(found) if found else None


def _cgroup_memory_left() -> int | None:
    """What this process's cgroup (v2 or v1; inside a container its own cgroup is the mount's root) lets it allocate
    beyond its current use; None without a limit or where none can be read."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        if parts[0] == "0" and parts[1] == "":  # cgroup v2
            mount, names = Path("/sys/fs/cgroup"), ("memory.max", "memory.current")
        elif "memory" in parts[1].split(","):  # cgroup v1
            mount, names = Path("/sys/fs/cgroup/memory"), ("memory.limit_in_bytes", "memory.usage_in_bytes")
        else:
            continue
        candidates += [(folder / names[0], folder / names[1]) for folder in (mount / parts[2].lstrip("/"), mount)]
    left = []
    for limit, used in candidates:
        try:
            cap = limit.read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:  # else no limit (v1 writes a huge number)
                left.append(max(0, int(cap) - int(used.read_text().strip())))
        except (OSError, ValueError):
            continue
    return min(left) if left else None


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: ``3.1 TB``, ``18.5 GiB``-style (binary units, one decimal)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def check_memory(what: str, needed: int, fix: str) -> None:
    """ConfigError, one line (``what``, the bytes it needs, the bytes available, ``fix``), when ``needed`` bytes
    exceed :func:`available_memory`; nothing when that cannot be read."""
    available = available_memory()
    if available is not None and needed > available:
        raise ConfigError(f"{what}: needs about {format_bytes(needed)} of memory, more than the "
                          f"{format_bytes(available)} available on this machine; {fix}")
