"""robustness.core.processes: the one way the suite starts worker processes (the runner's ranks, the pipeline's
training jobs)."""
from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from robustness.core.errors import ConfigError
from robustness.core.processes import in_processes


def _pid_and_square(x: int) -> tuple[int, int]:
    return os.getpid(), x * x


def _fail_or_wait(rank: int) -> None:
    """Rank 0 fails; the others wait as a rank waits for a collective its failed peer never joins."""
    if rank == 0:
        raise ConfigError("rank 0 found a bad setting")
    time.sleep(600)


def test_results_come_back_in_call_order_from_spawned_processes():
    got = in_processes(_pid_and_square, [(3,), (1,), (2,)], workers=3)
    assert [square for _, square in got] == [9, 1, 4]
    assert all(pid != os.getpid() for pid, _ in got)


def test_a_failed_call_is_reraised_as_its_own_type_and_stops_the_waiting_workers():
    with pytest.raises(ConfigError, match="rank 0 found a bad setting"):
        in_processes(_fail_or_wait, [(0,), (1,), (2,)], workers=3)
    assert multiprocessing.active_children() == []  # the waiting ranks were stopped, not left to sleep


def test_fewer_workers_than_calls_runs_them_all():
    got = in_processes(_pid_and_square, [(n,) for n in range(5)], workers=2)
    assert [square for _, square in got] == [0, 1, 4, 9, 16]
    assert len({pid for pid, _ in got}) <= 2
