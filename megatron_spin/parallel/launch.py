"""Run a function on N local ranks joined in one torch.distributed group, with a deadline.

Megatron failures on gloo tend to hang rather than fail (a rank dies, its peers block in a
collective forever), so every launch is bounded: when any rank fails, or the deadline
passes, all ranks are killed and the first failing rank's traceback is raised here.

    results = launch(worker, world_size=4, args=(...,), timeout=300)

``worker(rank, world_size, *args)`` runs in a fresh (spawned) process after
``torch.distributed.init_process_group`` on a free port; its return value (picklable) comes
back in ``results[rank]``.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import socket
import time
import traceback
from typing import Any, Callable, Sequence

from megatron_spin import platform
from megatron_spin.lifetime import die_with_parent


_EXIT_GRACE_S = 10.0


def _kill_group(p) -> None:
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        p.kill()


class LaunchError(RuntimeError):
    """A rank raised, died, or the launch ran past its deadline."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free ports (all held open until every one is chosen, so none repeats)."""
    socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _to_bytes(obj: Any) -> bytes:
    # Tensors put on a multiprocessing queue travel as shared-memory handles that die with
    # the sending process; a rank exits right after reporting, so results travel as bytes.
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _from_bytes(data: bytes) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(data), weights_only=False)


def _rank_main(fn, rank, world_size, port, args, queue, threads, deadline) -> None:
    import faulthandler

    import torch

    # Own process group: the parent can kill this rank together with anything it started
    # (checkpoint writer workers, shared-memory managers).
    os.setpgrp()
    die_with_parent()  # SIGKILL from a scheduler skips our cleanup; an orphaned gloo rank would wait forever
    import torch.distributed as dist

    # Ranks share the machine's cores; without a cap each rank spawns one thread per core and
    # N ranks oversubscribe the CPU N-fold.
    torch.set_num_threads(threads)
    # A hung rank prints where it is stuck shortly before the parent kills it.
    faulthandler.dump_traceback_later(max(1.0, deadline - time.time() - 3.0), exit=False)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank),
    )
    try:
        plat = platform.prepare_megatron()
        plat.set_device(rank)
        dist.init_process_group(plat.backend, rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        queue.put((rank, "ok", _to_bytes(result)))
    except BaseException:  # noqa: BLE001 - every failure must reach the parent
        queue.put((rank, "error", traceback.format_exc()))
        return
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(
    fn: Callable[..., Any],
    world_size: int,
    args: Sequence[Any] = (),
    timeout: float = 600.0,
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; see module doc."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, tuple(args), queue, threads, time.time() + timeout),
                    daemon=False)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    failure: str | None = None
    try:
        while len(results) < world_size and failure is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                failure = f"launch timed out after {timeout:.0f} s ({len(results)}/{world_size} ranks done)"
                break
            try:
                rank, status, payload = queue.get(timeout=min(1.0, remaining))
            except queue_mod.Empty:  # check for ranks that died without reporting
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    failure = f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode}"
                continue
            if status == "error":
                failure = f"rank {rank} failed:\n{payload}"
            else:
                results[rank] = _from_bytes(payload)
    finally:
        done = failure is None and len(results) == world_size  # False on Ctrl-C / errors too
        grace_end = time.monotonic() + _EXIT_GRACE_S
        for p in procs:
            if done:
                # Every rank has reported: a rank that does not exit soon after is stuck in
                # teardown (a lingering thread, a hung destroy), not doing work.
                p.join(timeout=max(0.0, grace_end - time.monotonic()))
            if p.is_alive():
                _kill_group(p)
            p.join()
    if failure is not None:
        raise LaunchError(failure)
    return [results[r] for r in range(world_size)]
