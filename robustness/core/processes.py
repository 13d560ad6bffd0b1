"""Worker processes on this machine: the one way the suite starts them.

Two uses share it: the ranks of one sharded job (the attack runner's ``workers``: every rank at once, each told its
rank the way torchrun would) and independent jobs (``dsn-robust run`` training ``[run] workers`` models at a time).
Both run in ``spawn``-started processes (fork would copy torch's thread pools and any CUDA state into the child) and
a worker's exception is re-raised in the caller as itself (pickled), so a typed error is still one line through the
CLI, and a SIGTERM reaches the workers through :mod:`robustness.core.signals` (they are this process's
``multiprocessing`` children).

When one call fails, the calls not yet started are cancelled and the running workers are stopped: a rank left
waiting for a failed peer's collective would otherwise hang until gloo's timeout (30 minutes). Python 3.14's
``ProcessPoolExecutor.terminate_workers`` does that; before it the pool's own process table is the only handle.
"""
from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_EXCEPTION, Future, ProcessPoolExecutor, wait
from contextlib import suppress
from typing import Any, Callable, Sequence


def in_processes(fn: Callable[..., Any], calls: Sequence[tuple], workers: int) -> list[Any]:
    """``fn(*args)`` for each ``args`` of ``calls`` in spawned processes, at most ``workers`` at a time; their results
    in the order of ``calls``. ``workers >= len(calls)`` runs every call at once (the ranks of one job). The first
    failure (in the order of ``calls``) is re-raised after the other workers are stopped."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    with ProcessPoolExecutor(max_workers=min(workers, len(calls)) or 1,
                             mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(fn, *args) for args in calls]
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in done and f.exception() is not None), None)
        if failed is not None:
            _stop(pool, futures)
            raise failed.exception()  # type: ignore[misc]
        return [f.result() for f in futures]


def _stop(pool: ProcessPoolExecutor, futures: list[Future]) -> None:
    for future in futures:
        future.cancel()
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    if terminate is not None:
        terminate()
        return
    for process in list((getattr(pool, "_processes", None) or {}).values()):
        with suppress(OSError, ValueError, AttributeError):
            process.terminate()
