"""The bounded launcher: results, failures with the rank's traceback, hangs, stuck teardown."""

from __future__ import annotations

import threading
import time

import pytest

from megatron_spin.parallel.launch import LaunchError, launch

pytestmark = [pytest.mark.dist, pytest.mark.timeout(300)]


def _sum_ranks(rank, world_size):
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(rank)])
    dist.all_reduce(t)
    return {"rank": rank, "sum": t.item()}


def _fail_on_one(rank, world_size):
    if rank == 1:
        raise ValueError("rank one is broken")
    import torch.distributed as dist

    dist.barrier()  # rank 0 would wait here forever: the launcher must not
    return rank


def _linger(rank, world_size):
    threading.Thread(target=time.sleep, args=(1000,), daemon=False).start()
    return rank


def test_results_come_back_in_rank_order():
    assert launch(_sum_ranks, 3, timeout=120) == [{"rank": r, "sum": 3.0} for r in range(3)]


def test_a_failing_rank_raises_with_its_traceback_and_peers_are_killed():
    started = time.monotonic()
    with pytest.raises(LaunchError, match="rank 1 failed") as info:
        launch(_fail_on_one, 2, timeout=120)
    assert "rank one is broken" in str(info.value)
    assert time.monotonic() - started < 60


def _hang(rank, world_size):
    time.sleep(1000)


def test_a_hung_launch_times_out():
    started = time.monotonic()
    with pytest.raises(LaunchError, match="timed out after 20 s"):
        launch(_hang, 2, timeout=20)
    assert time.monotonic() - started < 40


def test_stuck_teardown_does_not_hold_the_caller():
    started = time.monotonic()
    assert launch(_linger, 2, timeout=120) == [0, 1]
    assert time.monotonic() - started < 45
