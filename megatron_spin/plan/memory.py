"""Per-GPU memory of one trainer rank, item by item, in each phase of a step.

Static per parameter held by the rank (``N`` = :func:`params.rank_params`, ``D`` = DP size)::

    weights      2 bytes (bf16/fp16) or 4 (fp32)
    gradients    4: Megatron DDP reduces into fp32 main-grad buffers (grad_reduce_in_fp32)
    optimizer    mixed precision: fp32 master copy 4 + Adam m, v 8 = 12;  fp32: no master, 8
                 (SGD: 4 with momentum, else 0); the distributed optimizer shards exactly
                 these (master and moments) over the D data-parallel ranks: 12/D
    reference    weights of the frozen copy (2 or 4), or 0 while offloaded to the host

So bf16 Adam costs the classic 18 bytes per parameter, 6 + 12/D with the distributed
optimizer.  Activations come from :mod:`activations`.

Mixture of experts with EP ``e``: each rank holds E/e experts per layer (``N`` counts them,
:func:`params.rank_params`), and the distributed optimizer shards the expert weights
``N_e`` (:func:`params.rank_expert_params`) over the *expert*-data-parallel group only,
D/e ranks (the other ranks of the data-parallel group hold other experts), the rest over D::

    optimizer    12·(N − N_e)/D + 12·N_e/(D/e)

Weights, gradients (one fp32 main-grad buffer per parameter, expert or not) and the
reference copy are per parameter held, as for a dense model.  The MoE dispatch buffers of
the layer running add to the activations (``moe_dispatch``).

Phases (the peak of each is reported; the run needs the largest to fit):

* ``train``: static + activations (+ reference weights unless offloaded).  Colocated
  engines have released their memory (``/release_memory_occupation``).
* ``reference``: static + reference weights (an offloaded reference visits the device
  now) + a forward-only working set (one layer of one micro-batch, and the logits on
  the last stage: bf16 and fp32, 6·s·b·V/t).
* ``rollout`` (colocated engines only): static (+ resident reference) + SGLang's static
  pool, ``mem_fraction_static`` × the GPU.  SGLang sizes its KV cache so that the whole GPU
  is that full, whoever else holds memory, so the trainer's resident memory must fit in
  ``(1 - mem_fraction_static)`` of the GPU.

Not modelled: allocator fragmentation, the CUDA context, NCCL and cuBLAS workspaces,
SGLang's activations and CUDA graphs outside its static pool, FP8 weight caches, and
pipeline send/receive buffers.  A fixed per-GPU ``overhead`` term stands for all of them.
Sizes are bytes; reports use GiB (2^30 bytes), the unit GPU memory is sold in.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_spin.spec.arch import ModelArch
from megatron_spin.parallel.layout import ParallelLayout, padded_vocab_size
from megatron_spin.plan import activations as act
from megatron_spin.plan.params import model_params, rank_expert_params, rank_params

GIB = 2.0**30  # GPUs are sold in GiB: an "80 GB" H100 holds 80 GiB
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}  # spec.precision.DType values


@dataclasses.dataclass(frozen=True)
class TrainSetup:
    """Everything besides the architecture that decides a trainer rank's memory."""

    layout: ParallelLayout
    dp: int
    precision: str  # bfloat16 | float16 | float32
    optimizer: str  # adam | sgd
    sgd_momentum: float
    distributed_optimizer: bool
    recompute: bool
    reference: bool  # the loss needs a reference model (SimPO does not)
    ref_offload: bool
    seq_len: int  # max_prompt_length + max_response_length
    micro_seqs: int  # 2 × micro_pairs: chosen and rejected
    micro_batches: int  # per DP rank per step
    gpu_mem_gib: float
    engine_fraction: Optional[float] = None  # colocated SGLang mem_fraction_static, else None
    overhead_gib: float = 3.0
    activation_model: act.ActivationModel = act.MEGATRON_GPU


@dataclasses.dataclass(frozen=True)
class StageMemory:
    """Bytes per GPU of one pipeline stage, by item, and the peak of each phase."""

    stage: int
    params: int
    items: dict[str, float]
    phases: dict[str, float]
    expert_params: int = 0  # of ``params``, the expert weights (sharded over expert-DP only)

    @property
    def peak(self) -> float:
        return max(self.phases.values())


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    stages: list[StageMemory]
    gpu_bytes: float

    @property
    def worst(self) -> StageMemory:
        return max(self.stages, key=lambda st: st.peak)

    @property
    def fits(self) -> bool:
        return self.worst.peak <= self.gpu_bytes

    @property
    def phase_peaks(self) -> dict[str, float]:
        names = self.stages[0].phases
        return {k: max(st.phases[k] for st in self.stages) for k in names}


def optimizer_bytes_per_param(precision: str, optimizer: str, sgd_momentum: float = 0.0) -> int:
    """Master copy (16-bit params only) plus the optimizer's fp32 states."""
    states = 2 if optimizer == "adam" else (1 if sgd_momentum else 0)
    master = 4 if DTYPE_BYTES[precision] == 2 else 0
    return master + 4 * states


def stage_memory(arch: ModelArch, setup: TrainSetup, stage: int) -> StageMemory:
    lay, pbytes = setup.layout, DTYPE_BYTES[setup.precision]
    n = rank_params(arch, lay, stage)
    n_exp = rank_expert_params(arch, lay, stage)
    per = optimizer_bytes_per_param(setup.precision, setup.optimizer, setup.sgd_momentum)
    opt = per * n
    if setup.distributed_optimizer:
        # megatron-core 0.16.1, optimizer/__init__.py get_megatron_optimizer: parameters with
        # allreduce=False (the experts' linears, transformer/moe/experts.py) get a DistributedOptimizer
        # of their own over intra_expt_dp_group (D/EP ranks); the rest shard over intra_dp_cp_group (D).
        opt = per * (n - n_exp) / setup.dp + (per * n_exp / (setup.dp // lay.ep) if n_exp else 0)
    acts = act.stage_activations(arch, s=setup.seq_len, b=setup.micro_seqs, tp=lay.tp, pp=lay.pp,
                                 vpp=lay.chunks_per_rank, stage=stage, micro_batches=setup.micro_batches,
                                 recompute=setup.recompute, model=setup.activation_model, act_bytes=pbytes)
    ref_weights = n * pbytes if setup.reference else 0.0
    items = {
        "weights": float(n * pbytes),
        "gradients": float(n * 4),
        "optimizer": float(opt),
        "activations": acts.stored + acts.output,
        "recompute_working": acts.working,
        **({"moe_dispatch": acts.dispatch} if arch.is_moe else {}),
        "reference": 0.0 if setup.ref_offload else ref_weights,
        "overhead": setup.overhead_gib * GIB,
    }
    static = items["weights"] + items["gradients"] + items["optimizer"] + items["overhead"]
    phases = {"train": static + items["reference"] + acts.total}
    if setup.reference:
        fwd = act.layer_bytes(arch, setup.seq_len, setup.micro_seqs, lay.tp, setup.activation_model, pbytes)
        fwd += acts.dispatch  # the MoE layer's all-to-all buffers (0 for a dense model)
        if stage == lay.pp - 1:
            fwd += 6 * setup.seq_len * setup.micro_seqs * padded_vocab_size(arch.vocab_size, lay.tp) / lay.tp
        phases["reference"] = static + ref_weights + fwd
    if setup.engine_fraction is not None:
        items["rollout_engine"] = setup.engine_fraction * setup.gpu_mem_gib * GIB
        phases["rollout"] = static + items["reference"] + items["rollout_engine"]
    return StageMemory(stage, n, items, phases, n_exp)


def estimate(arch: ModelArch, setup: TrainSetup) -> MemoryEstimate:
    stages = [stage_memory(arch, setup, i) for i in range(setup.layout.pp)]
    return MemoryEstimate(stages, setup.gpu_mem_gib * GIB)


def max_engine_fraction(est: MemoryEstimate) -> float:
    """The largest colocated ``mem_fraction_static`` the trainer's resident memory leaves room for."""
    resident = max(st.phases["rollout"] - st.items["rollout_engine"] if "rollout" in st.phases else 0.0
                   for st in est.stages)
    return max(0.0, 1.0 - resident / est.gpu_bytes)


@dataclasses.dataclass(frozen=True)
class EngineMemory:
    """One rollout engine GPU: weights and the KV cache room SGLang's static pool leaves."""

    weights: float
    static_pool: float
    kv_bytes_per_token: float
    kv_tokens: int
    tokens_needed: int  # all samples of a step held at full length by one engine


def engine_memory(arch: ModelArch, *, engine_tp: int, fraction: float, gpu_mem_gib: float, prompts: int, n: int,
                  seq_len: int, engines: int) -> EngineMemory:
    # SGLang keeps weights in bf16 and shards KV heads over TP, replicating them when TP > g.
    weights = 2.0 * model_params(arch) / engine_tp
    kv_heads = max(1, arch.num_kv_heads // engine_tp)
    per_token = 2 * arch.num_layers * kv_heads * arch.head_dim * 2
    pool = fraction * gpu_mem_gib * GIB
    tokens = int(max(0.0, pool - weights) // per_token)
    need = -(-prompts * n // max(1, engines)) * seq_len
    return EngineMemory(weights, pool, per_token, tokens, need)
