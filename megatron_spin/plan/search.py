"""Enumerate the layouts the trainer would accept and rank those that fit.

Candidates: TP over the divisors of the GPUs per node (TP stays inside a node's NVLink
domain), PP over the divisors of the layer count, the preset's VPP where it applies, for a
mixture-of-experts model EP over the divisors of the expert count (EP = 1 for a dense
model), and every combination of distributed optimizer, full recompute and reference
offload (offload only when the loss uses a reference).  Each (TP, PP, EP) must pass the same
start-up rules as a real run — :meth:`Placement.plan` and :func:`validate_layout` (which
holds DP % EP == 0, E % EP == 0, f_e % TP == 0) — and the batch must give every DP rank work.

Ranking: first whether the largest phase fits the GPU, then a step-time proxy (seconds,
training and reference passes only; generation does not depend on the trainer layout)::

    FLOPs per GPU / ACHIEVED_FLOPS × (1 + bubble) × (1 + TP_COST·(TP − 1)) × (1 + A2A_COST·(EP − 1)/EP)
        + offload copies

with ``bubble = (PP − 1)/(VPP·M)`` for ``M`` micro-batches per DP rank, recompute's extra
forward inside the FLOPs (MoE: the active experts' FLOPs, :mod:`megatron_spin.spec.flops`),
an offloaded reference paying a host→device and a device→host copy of its weights per step
over ``HOST_LINK`` bytes/s, and the MoE all-to-all growing with the share ``(EP − 1)/EP`` of
routed tokens that leave the rank.  The constants are round numbers for H100-class nodes;
DP gradient reduction and PP point-to-point traffic are left out.  The proxy orders
layouts, it does not predict time.
Ties go to smaller TP·PP, then smaller EP, then fewer features switched on.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Optional

from megatron_spin.errors import ConfigError
from megatron_spin.parallel.layout import LayoutError, ParallelLayout, validate_layout
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec import flops as fl
from megatron_spin.plan.memory import DTYPE_BYTES, MemoryEstimate, TrainSetup, estimate
from megatron_spin.plan.preset import PlanInput, plan_placement, schedule_problems, train_setup

ACHIEVED_FLOPS = 400e12  # bf16 dense FLOP/s one GPU sustains in training (~40% of an H100's peak)
TP_COST = 0.03  # step-time share per extra TP rank: two activation all-reduces per layer, NVLink
HOST_LINK = 25e9  # bytes/s, pinned host memory over PCIe 4/5
A2A_COST = 0.15  # MoE step-time share of the token all-to-all when (almost) every routed token leaves the rank


@dataclasses.dataclass(frozen=True)
class Candidate:
    setup: TrainSetup
    world: int  # trainer GPUs
    memory: MemoryEstimate
    step_s: float  # time proxy (see the module doc)
    problems: tuple[str, ...] = ()

    @property
    def fits(self) -> bool:
        return self.memory.fits and not self.problems

    @property
    def key(self) -> tuple:
        s = self.setup
        return (not self.fits, round(self.step_s, 6), s.layout.tp * s.layout.pp, s.layout.pp, s.layout.ep,
                s.recompute, s.ref_offload, s.distributed_optimizer)


def step_time_proxy(inp: PlanInput, setup: TrainSetup, world: int) -> float:
    tokens = setup.micro_batches * setup.micro_seqs * setup.seq_len * setup.dp
    flops = fl.train_step_flops(inp.arch, tokens, setup.seq_len, recompute=setup.recompute, reference=setup.reference)
    lay = setup.layout
    bubble = (lay.pp - 1) / (lay.chunks_per_rank * max(1, setup.micro_batches))
    compute = flops / world / ACHIEVED_FLOPS * (1 + bubble) * (1 + TP_COST * (lay.tp - 1))
    if lay.ep > 1:
        compute *= 1 + A2A_COST * (lay.ep - 1) / lay.ep
    offload = 0.0
    if setup.reference and setup.ref_offload:
        ref_bytes = max(st.params for st in estimate(inp.arch, setup).stages) * DTYPE_BYTES[setup.precision]
        offload = 2 * ref_bytes / HOST_LINK
    return compute + offload


def evaluate(inp: PlanInput, setup: TrainSetup, world: int) -> Candidate:
    return Candidate(setup, world, estimate(inp.arch, setup), step_time_proxy(inp, setup, world),
                     tuple(schedule_problems(setup)))


def requested(inp: PlanInput) -> Candidate:
    return evaluate(inp, train_setup(inp), inp.placement.trainer_world)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def expert_parallel_sizes(arch: ModelArch, dp: int) -> list[int]:
    """EP sizes to try: divisors of the expert count that divide DP (EP ranks are DP ranks); 1 if dense."""
    if not arch.is_moe:
        return [1]
    return [e for e in _divisors(arch.num_experts) if dp % e == 0]


def enumerate_candidates(inp: PlanInput, *, max_tp: Optional[int] = None) -> list[Candidate]:
    """Every accepted layout × optimizer/recompute/offload variant, best first."""
    gpn = inp.run.trainer.n_gpus_per_node
    tps = _divisors(max_tp or gpn or inp.layout.tp)
    vpp_req = inp.layout.vpp if (inp.layout.vpp or 1) > 1 else None
    uses_ref = train_setup(inp).reference
    out = []
    for tp in tps:
        for pp in _divisors(inp.arch.num_layers):
            try:
                placement = plan_placement(inp.run, tp, pp)
            except ConfigError:  # TP·PP does not divide the trainer GPUs
                continue
            dp = placement.trainer_world // (tp * pp)
            for vpp, ep in itertools.product([None, vpp_req] if vpp_req and pp > 1 else [None],
                                             expert_parallel_sizes(inp.arch, dp)):
                layout = ParallelLayout(tp, pp, vpp, ep=ep)
                try:
                    validate_layout(inp.arch, layout, world_size=placement.trainer_world)
                except LayoutError:
                    continue
                for dist_opt in ((False, True) if dp > 1 else (False,)):  # nothing to shard at DP = 1
                    for recompute in (False, True):
                        for offload in ((False, True) if uses_ref else (False,)):
                            setup = train_setup(inp, layout=layout, dp=dp, distributed_optimizer=dist_opt,
                                                recompute=recompute, ref_offload=offload)
                            out.append(evaluate(inp, setup, placement.trainer_world))
    return sorted(out, key=lambda c: c.key)
