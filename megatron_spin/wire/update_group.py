"""A process group between the trainer's pusher and the rollout engines, outside the default one.

The trainer ranks already belong to a default process group (Megatron's), and each engine
process is its own program: the weight-update group is built *beside* both.  It is built
exactly the way SGLang builds its side (``init_custom_process_group``): a TCP store at
``master_address:master_port`` hosted by rank 0 (the pusher), wrapped in a ``PrefixStore``
named after the group, handed to torch's process-group factory with the group's name — so
a trainer group meets an SGLang engine's, and the embedded engine exercises the same code
on the CPU.  No collective runs at join time (SGLang's first collective is the first weight).
Rank 0 broadcasts; engine ranks are ``rank_offset + engine_tp_rank``.

``backend`` is ``"nccl"`` on GPUs and ``"gloo"`` for CPU tensors (the embedded engine, tests).
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Optional

import torch
import torch.distributed as dist

from megatron_spin import platform

BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass
class UpdateGroup:
    pg: object  # the torch ProcessGroup
    store: object  # kept alive with the group (rank 0 hosts the store's server)
    name: str
    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """Group-local ``src`` (the ProcessGroup object's own ranks, whatever the default group is)."""
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()

    def destroy(self) -> None:
        try:
            dist.destroy_process_group(self.pg)
        except (ValueError, RuntimeError, AssertionError, KeyError):
            pass  # already gone (e.g. the peer died); nothing left to release


def host_store(master_address: str, world_size: int, timeout_s: float = 300.0) -> dist.TCPStore:
    """Rank 0's store on a port the OS picks (read it from ``.port``): no window for a port race."""
    return dist.TCPStore(master_address, 0, world_size, is_master=True,
                         timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)


def create_update_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "gloo", timeout_s: float = 300.0, store: Optional[dist.TCPStore] = None,
    join_timeout_s: Optional[float] = None,
) -> UpdateGroup:
    """Join the group (rank 0 passes the store from :func:`host_store`).  ``timeout_s`` bounds each
    collective; ``join_timeout_s`` (default: the same) bounds the join itself — reaching the store
    and, on gloo, waiting for every other member to arrive."""
    from torch.distributed.distributed_c10d import _new_process_group_helper, _world

    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    joining = datetime.timedelta(seconds=timeout_s if join_timeout_s is None else join_timeout_s)
    if store is None:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0), timeout=joining,
                              wait_for_workers=False)
    # The name is part of every store key the factory uses: both sides must pass the same one
    # (the pusher makes it unique per group it forms).  Gloo meets its peers inside the factory,
    # under the group's timeout: the join's, then the collectives' from here on.
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, dist.PrefixStore(group_name, store),
                                      group_name=group_name, timeout=joining)
    if joining != timeout:
        pg.set_timeout(timeout)
        store.set_timeout(timeout)  # NCCL meets its peers through the store at the first collective
    # What torch's own group constructors record (and SGLang's too): group rank i is "global"
    # rank i of this group, so dist.broadcast(src=0, group=pg) and destroy_process_group work.
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return UpdateGroup(pg, store, group_name, rank, world_size, platform.current().device_for_backend(backend))
