"""From a preset name and a cluster shape to a validated plan input, by the trainer's own rules.

    inp = load_plan_input(PlanRequest(preset="spin_70b", gpu_mem_gib=80))

The preset is composed with Hydra exactly as ``megatron-spin-train`` composes it (plus the
user's ``key=value`` overrides and the cluster shape as ``trainer.*`` overrides).  Keys a
preset leaves mandatory (``???``) that only matter for running — the data files and the
model path — are filled with placeholders, since planning reads neither.  Then the three
start-up checks run in the trainer's order: :func:`load_run_config` (every key and
cross-section rule), :meth:`Placement.plan` (how many GPUs train, how many serve) and
:func:`validate_layout` (TP/PP/VPP against the architecture and the trainer world).
Their errors pass through unchanged: they already name the key or the rule.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_spin.errors import ConfigError
from megatron_spin.config.run import RunConfig, load_run_config, missing_keys
from megatron_spin.spec.arch import ModelArch
from megatron_spin.orchestrate.placement import Placement
from megatron_spin.parallel.layout import ParallelLayout, validate_layout
from megatron_spin.plan.activations import MEGATRON_GPU, MODELS, ActivationModel
from megatron_spin.plan.memory import TrainSetup
from megatron_spin.pairs.modes import PairStrategy, SpinSelection
from megatron_spin.plan.models import resolve_model
from megatron_spin.rollout.launcher import EngineKind

CONFIG_MODULE = "megatron_spin.config.conf"
# Keys a run must give but planning never reads: filled when a preset leaves them for the command
# line.  Each entry: placeholder, and when the run needs the key (given the composed config).
PLACEHOLDERS = {
    "data.train_files": (["<plan-only>.jsonl"], lambda c: True),
    "actor_rollout_ref.model.path": ("<plan-only>", lambda c: True),
    "reward_model.path": ("<plan-only>", lambda c: c["reward_model"]["type"] == "hf"),
    "reward_model.url": ("http://plan-only", lambda c: c["reward_model"]["type"] == "http"),
    "reward_model.function": ("plan_only:reward", lambda c: c["reward_model"]["type"] == "function"),
    "trainer.ray_address": ("plan-only:6379", lambda c: c["trainer"]["nnodes"] > 1),  # the launcher sets it
}
# SGLang picks mem_fraction_static itself when it is not given: about this much of a large GPU
# (the exact value depends on the GPU's memory and the TP size).
SGLANG_DEFAULT_FRACTION = 0.85


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    preset: str = "spin_trainer"
    overrides: tuple[str, ...] = ()
    model: Optional[str] = None  # path or published name; default: the preset's model
    nodes: Optional[int] = None  # default: the preset's trainer.nnodes
    gpus_per_node: Optional[int] = None  # default: the preset's trainer.n_gpus_per_node
    gpu_mem_gib: float = 80.0
    overhead_gib: float = 3.0
    config_dir: Optional[str] = None  # compose from this directory instead of the packaged presets
    activations: str = "megatron-gpu"  # activation model (plan.activations.MODELS): megatron-gpu | paper


@dataclasses.dataclass(frozen=True)
class PlanInput:
    run: RunConfig
    arch: ModelArch
    model_source: str
    placement: Placement
    layout: ParallelLayout
    gpu_mem_gib: float
    overhead_gib: float
    placeholders: tuple[str, ...]  # mandatory keys filled with placeholders
    notes: tuple[str, ...]
    activation_model: ActivationModel = MEGATRON_GPU

    @property
    def dp(self) -> int:
        return self.placement.trainer_world // self.layout.model_parallel_size


def compose_preset(preset: str, overrides: tuple[str, ...] = (), config_dir: Optional[str] = None):
    """(composed DictConfig, keys filled with placeholders)."""
    from hydra import compose, initialize_config_dir, initialize_config_module
    from omegaconf import OmegaConf

    init = (initialize_config_dir(config_dir=config_dir, version_base=None) if config_dir
            else initialize_config_module(config_module=CONFIG_MODULE, version_base=None))
    with init:
        cfg = compose(config_name=preset, overrides=list(overrides))
    tree = OmegaConf.to_container(cfg, resolve=False)
    filled = []
    for key in sorted(missing_keys(tree) | _unset_run_keys(tree)):
        if key not in PLACEHOLDERS:
            raise ConfigError(key, f"mandatory in preset {preset!r} (???); give it on the command line as {key}=...")
        OmegaConf.update(cfg, key, PLACEHOLDERS[key][0])
        filled.append(key)
    return cfg, tuple(filled)


def _unset_run_keys(tree: dict) -> set[str]:
    """Run-only keys the run needs but the preset leaves empty (null, [] or "").  Presets write
    "required" as an empty value: OmegaConf's merge keeps the base preset's value under a ``???``
    (``defaults: [spin_trainer, _self_]``), so ``???`` cannot mark a key the base sets."""
    def value(key: str):
        node = tree
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        return node

    return {key for key, (_, needed) in PLACEHOLDERS.items()
            if value(key) in (None, [], "") and needed(tree)}


def cluster_overrides(req: PlanRequest) -> tuple[str, ...]:
    shape = []
    if req.nodes is not None:
        shape.append(f"trainer.nnodes={req.nodes}")
    if req.gpus_per_node is not None:
        shape.append(f"trainer.n_gpus_per_node={req.gpus_per_node}")
    return tuple(req.overrides) + tuple(shape)  # the flags win over the same keys given as overrides


def plan_placement(run: RunConfig, tp: int, pp: int) -> Placement:
    r, t = run.rollout, run.trainer
    return Placement.plan(tp=tp, pp=pp, nnodes=t.nnodes, gpus_per_node=t.n_gpus_per_node,
                          num_engines=r.num_engines, engine_tp=r.tp_size, colocated=r.colocated,
                          cpu_ranks=t.cpu_ranks, engines_in_ranks=r.engines_in_ranks)


def load_plan_input(req: PlanRequest) -> PlanInput:
    """Compose, validate (the trainer's three start-up checks), resolve the model."""
    if req.activations not in MODELS:
        raise ValueError(f"--activations {req.activations!r}: one of {sorted(MODELS)}")
    hcfg, filled = compose_preset(req.preset, cluster_overrides(req), req.config_dir)
    run = load_run_config(hcfg)
    arch, source = resolve_model(req.model, req.preset, run.actor_rollout_ref.model.path)
    a = run.actor
    placement = plan_placement(run, a.tp, a.pp)
    layout = a.layout
    validate_layout(arch, layout, world_size=placement.trainer_world)
    notes = []
    if run.trainer.n_gpus_per_node == 0:
        notes.append("trainer.n_gpus_per_node=0: a CPU run; the numbers are host memory per rank")
    r = run.rollout
    if r.engine == EngineKind.SGLANG and r.mem_fraction_static is None and run.trainer.n_gpus_per_node:
        notes.append(f"actor_rollout_ref.rollout.mem_fraction_static is not set: SGLang picks its own; assumed "
                     f"{SGLANG_DEFAULT_FRACTION}" + (" (set it: a colocated trainer needs the rest of the GPU)"
                                                     if r.colocated else ""))
    if arch.is_moe and layout.tp > 1:
        # models/builder.py check_moe_training: Megatron trains MoE at TP > 1 only with sequence
        # parallelism, which needs TransformerEngine's norms.
        notes.append("MoE at TP > 1 trains only with sequence parallelism (TransformerEngine; estimated so)"
                     + ("; a CPU run refuses it: use TP=1 and EP" if run.trainer.n_gpus_per_node == 0 else ""))
    if a.precision.fp8 is not None:
        notes.append("actor.precision.fp8: estimated as bf16 (FP8 weight caches and fp8-saved activations not modelled)")
    return PlanInput(run, arch, source, placement, layout, req.gpu_mem_gib, req.overhead_gib, filled, tuple(notes),
                     MODELS[req.activations])


def pairs_per_step(run: RunConfig) -> int:
    """Most pairs one step can train on: one per prompt, or every sample pair / sample per prompt."""
    alg, n = run.algorithm, run.rollout.n
    if alg.spin:
        per_prompt = n if alg.pairs.spin_selection == SpinSelection.ALL else 1
    else:
        per_prompt = n * (n - 1) // 2 if alg.pairs.strategy == PairStrategy.ALL_PAIRS else 1
    return run.data.train_batch_size * per_prompt


def needs_reference(run: RunConfig) -> bool:
    return run.algorithm.loss.needs_reference


def engine_fraction(run: RunConfig) -> Optional[float]:
    """SGLang's static share of a trainer GPU when engines are colocated with the trainer, else None."""
    r = run.rollout
    if not r.colocated or r.engine != EngineKind.SGLANG or run.trainer.n_gpus_per_node == 0:
        return None
    return r.mem_fraction_static if r.mem_fraction_static is not None else SGLANG_DEFAULT_FRACTION


def train_setup(inp: PlanInput, *, layout: Optional[ParallelLayout] = None, dp: Optional[int] = None,
                distributed_optimizer: Optional[bool] = None, recompute: Optional[bool] = None,
                ref_offload: Optional[bool] = None) -> TrainSetup:
    """The memory model's inputs for the requested layout, or for a variant of it."""
    run, a = inp.run, inp.run.actor
    layout = layout or inp.layout
    dp = dp or inp.dp
    return TrainSetup(
        layout=layout, dp=dp, precision=a.precision.params_dtype, optimizer=a.optim.optimizer, sgd_momentum=a.optim.sgd_momentum,
        distributed_optimizer=a.optim.use_distributed_optimizer if distributed_optimizer is None
        else distributed_optimizer,
        recompute=a.recompute if recompute is None else recompute,
        reference=needs_reference(run),
        ref_offload=run.actor_rollout_ref.ref.offload if ref_offload is None else ref_offload,
        seq_len=run.data.max_prompt_length + run.data.max_response_length,
        micro_seqs=2 * a.micro_pairs,
        micro_batches=pairs_per_step(run) // (dp * a.micro_pairs),
        gpu_mem_gib=inp.gpu_mem_gib, engine_fraction=engine_fraction(run), overhead_gib=inp.overhead_gib,
        activation_model=inp.activation_model,
    )


def schedule_problems(setup: TrainSetup) -> list[str]:
    """Batch geometry that would leave the step without work or break the interleaved schedule."""
    probs = []
    if setup.micro_batches < 1:
        probs.append(f"data.train_batch_size gives fewer pairs than DP x actor.micro_pairs = "
                     f"{setup.dp} x {setup.micro_seqs // 2}: no DP rank gets a micro-batch")
    elif setup.layout.chunks_per_rank > 1 and setup.micro_batches < setup.layout.pp:
        probs.append(f"interleaved PP needs micro-batches per step >= PP (Megatron): {setup.micro_batches} < "
                     f"{setup.layout.pp}")
    return probs
