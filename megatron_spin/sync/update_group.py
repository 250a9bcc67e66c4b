"""A process group between the trainer's pusher and the rollout engines, outside the default one.

The trainer ranks already belong to a default process group (Megatron's), and each engine
process is its own program: the weight-update group is built *beside* both, from a TCP store
at ``master_address:master_port`` whose rank 0 (the pusher) hosts it.  Keys are prefixed with
the group name so several groups (one per pipeline stage's pusher) share nothing by accident.
Rank 0 broadcasts; engine ranks are ``rank_offset + engine_tp_rank``.

``backend`` is ``"nccl"`` on GPUs (SGLang's engines accept only what their device supports)
and ``"gloo"`` for CPU tensors, which is how the embedded engine and the tests run it.
"""

from __future__ import annotations

import dataclasses
import datetime

import torch
import torch.distributed as dist

BACKENDS = ("gloo", "nccl")


@dataclasses.dataclass
class UpdateGroup:
    pg: object  # the torch ProcessGroup
    store: object  # kept alive with the group (rank 0 hosts the store's server)
    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        self.pg.broadcast([tensor], opts).wait()


def create_update_group(
    master_address: str, master_port: int, rank: int, world_size: int, group_name: str,
    backend: str = "gloo", timeout_s: float = 300.0, store=None,
) -> UpdateGroup:
    """Join a group of ``world_size`` ranks; blocks until every rank has joined.

    Rank 0 may pass the ``TCPStore`` it already hosts (created with port 0, so the OS picks a
    free port that the engines are then told about — no window for another process to take it).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if not (0 <= rank < world_size):
        raise ValueError(f"rank {rank} outside a group of {world_size}")
    timeout = datetime.timedelta(seconds=timeout_s)
    if store is None:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=(rank == 0), timeout=timeout,
                              wait_for_workers=False)
    prefixed = dist.PrefixStore(f"megatron_spin/{group_name}/", store)
    if backend == "gloo":
        pg, device = dist.ProcessGroupGloo(prefixed, rank, world_size, timeout), torch.device("cpu")
    else:  # pragma: no cover - GPU tier
        pg, device = dist.ProcessGroupNCCL(prefixed, rank, world_size), torch.device("cuda", torch.cuda.current_device())
    group = UpdateGroup(pg, store, rank, world_size, device)
    group.broadcast(torch.zeros(1, device=device))  # a barrier: every rank has joined
    return group
