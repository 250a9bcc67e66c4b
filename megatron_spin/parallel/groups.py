"""Initialise megatron's model-parallel state and hand the groups around as one object.

Only this module (and the platform patches) read or write ``megatron.core.parallel_state``
globals; model, loss and algorithm code receive a :class:`ParallelContext`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch.distributed as dist

from megatron_spin import platform
from megatron_spin.parallel.layout import ParallelLayout


@dataclasses.dataclass(frozen=True)
class ParallelContext:
    layout: ParallelLayout
    rank: int
    world_size: int
    tp_rank: int
    pp_rank: int
    dp_rank: int
    dp_size: int
    tp_group: Any
    pp_group: Any
    dp_group: Any
    embedding_group: Any
    pp_last_rank: int  # global rank of the last stage in this rank's pipeline group
    model_parallel_ranks: tuple[int, ...] = ()  # global ranks of this rank's model replica (TP x PP)
    # Expert parallelism (MoE): this rank's place among the EP ranks that split each layer's
    # experts, and the groups expert weights are gathered over (EP) and averaged over (expert DP).
    ep_rank: int = 0
    ep_group: Any = None
    expert_dp_group: Any = None

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.layout.pp - 1

    def chunk_is_first(self, vp_stage: int) -> bool:
        return self.is_first_stage and vp_stage == 0

    def chunk_is_last(self, vp_stage: int) -> bool:
        return self.is_last_stage and vp_stage == self.layout.chunks_per_rank - 1


def init_parallel(layout: ParallelLayout, seed: int = 1234) -> ParallelContext:
    """Set up TP/PP/DP groups on an initialised default process group.

    Also seeds megatron's model-parallel RNG tracker (needed for weight init and dropout).
    """
    platform.prepare_megatron()
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    if not dist.is_initialized():
        raise RuntimeError("init_parallel needs torch.distributed initialised (use parallel.launch)")
    world = dist.get_world_size()
    layout.data_parallel_size(world)
    if ps.model_parallel_is_initialized():
        destroy_parallel()
    before = set(_live_groups())
    ps.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if (layout.vpp or 1) > 1 else None,
        expert_model_parallel_size=layout.ep,
    )
    _megatron_groups[:] = [g for g in _live_groups() if g not in before]
    model_parallel_cuda_manual_seed(seed)
    return ParallelContext(
        layout=layout,
        rank=dist.get_rank(),
        world_size=world,
        tp_rank=ps.get_tensor_model_parallel_rank(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        tp_group=ps.get_tensor_model_parallel_group(),
        pp_group=ps.get_pipeline_model_parallel_group(),
        dp_group=ps.get_data_parallel_group(),
        embedding_group=ps.get_embedding_group(check_initialized=False),
        pp_last_rank=ps.get_pipeline_model_parallel_last_rank(),
        model_parallel_ranks=tuple(dist.get_process_group_ranks(ps.get_model_parallel_group())),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=ps.get_expert_data_parallel_group(),
    )


# The groups the last init_parallel created.  megatron's destroy_model_parallel only forgets its
# references; torch's registry keeps each group, and a gloo group its sockets (~80 descriptors
# per layout at world 4), so a process that builds many layouts in turn runs out of files.
_megatron_groups: list[Any] = []


def _live_groups() -> list[Any]:
    """Every process group torch's registry holds, the default (world) group excepted."""
    world = dist.group.WORLD
    return [g for g in list(dist.distributed_c10d._world.pg_map) if g is not world]


def destroy_parallel() -> None:
    """Tear down megatron's parallel state and the process groups it created (not the world)."""
    from megatron.core import parallel_state as ps

    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    live = set(_live_groups())
    for group in _megatron_groups:
        if group in live:
            dist.destroy_process_group(group)
    _megatron_groups.clear()

