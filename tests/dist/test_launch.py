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


def _cycle_layouts(rank, world_size, cycles):
    """Open descriptors, registered groups and threads after each init/destroy cycle of 4 layouts."""
    import os

    import torch
    import torch.distributed as dist

    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.parallel.layout import ParallelLayout

    def threads():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Threads:"))

    fds, groups, nthreads = [], [], []
    for _ in range(cycles):
        for layout in (ParallelLayout(1, 1), ParallelLayout(2, 1), ParallelLayout(1, 2), ParallelLayout(2, 2)):
            pctx = init_parallel(layout)
            dist.all_reduce(torch.ones(1), group=pctx.tp_group)  # the groups are live
            destroy_parallel()
        fds.append(len(os.listdir("/proc/self/fd")))
        groups.append(len(dist.distributed_c10d._world.pg_map))
        nthreads.append(threads())
    return fds, groups, nthreads


def test_destroy_parallel_releases_the_groups_it_created():
    """Building layout after layout in one process (the parity matrix, tools) keeps descriptors
    and threads bounded.  Each gloo group holds sockets and threads: before destroy_parallel
    released them, a layout at world 4 left ~80 descriptors and ~40 threads per rank behind, so
    the 30-layout parity launch held ~5,000 threads, and under a 1024-file limit it fails."""
    for fds, groups, nthreads in launch(_cycle_layouts, 4, (6,), timeout=180):
        assert groups == [1] * len(groups), groups  # only the world group is left registered
        # Per cycle of four layouts, far below one layout's former leak.
        assert fds[-1] - fds[0] < 40, fds
        assert nthreads[-1] - nthreads[0] < 10, nthreads
