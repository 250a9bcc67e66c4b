"""Start-up rules that need the model's config or the placement, checked before anything starts.

Each raises :class:`ConfigError` naming the keys and the rule.  They run on the HF config
alone (no conversion, no Ray, no model build, no engine), so a first run of a mistyped
command fails in a second, not after a model conversion or a cluster start:

* the layout suits the model (``validate_layout``: heads and layers divide, world size);
* a prompt and its response fit the model's context (``max_position_embeddings``): a longer
  sequence is refused by the engine at the first generation, or trains on positions the
  model never saw;
* a step's prompts can fill one micro-batch on every data-parallel rank: with at most one pair
  per prompt (best-vs-worst, SPIN's first sample), fewer prompts than ``DP × micro_pairs``
  leaves every update padded with pairs that carry no loss — compute spent on nothing;
* a reward function imports (found here rather than at the first scoring, after start-up).
"""

from __future__ import annotations

from megatron_spin.config.run import RunConfig
from megatron_spin.errors import ConfigError, require
from megatron_spin.orchestrate.placement import Placement
from megatron_spin.pairs.modes import PairStrategy, SpinSelection
from megatron_spin.parallel.layout import LayoutError, check_moe_layout_for_training, validate_layout
from megatron_spin.reward import RewardError, RewardType
from megatron_spin.reward.function import resolve_function
from megatron_spin.spec.arch import ModelArch


def max_pairs_per_prompt(cfg: RunConfig) -> int:
    """The most pairs one prompt's ``n`` samples can make under ``algorithm``."""
    n, pairs = cfg.rollout.n, cfg.algorithm.pairs
    if cfg.algorithm.spin:
        return n if pairs.spin_selection == SpinSelection.ALL else 1
    return n * (n - 1) // 2 if pairs.strategy == PairStrategy.ALL_PAIRS else 1


def plan_placement(cfg: RunConfig) -> Placement:
    """Where the run's trainer ranks and engines go (its own rules: GPUs, nodes, CPU ranks)."""
    a, t = cfg.actor, cfg.trainer
    return Placement.plan(tp=a.tp, pp=a.pp, nnodes=t.nnodes, gpus_per_node=t.n_gpus_per_node,
                          num_engines=cfg.rollout.num_engines, engine_tp=cfg.rollout.tp_size,
                          colocated=cfg.rollout.colocated, cpu_ranks=t.cpu_ranks,
                          engines_in_ranks=cfg.rollout.engines_in_ranks)


def check_run(cfg: RunConfig, arch: ModelArch, placement: Placement) -> None:
    a, d = cfg.actor, cfg.data
    model = cfg.actor_rollout_ref.model.path
    try:
        validate_layout(arch, a.layout, world_size=placement.trainer_world)
    except LayoutError as exc:
        raise ConfigError("actor_rollout_ref.actor", f"tp={a.tp}, pp={a.pp}, vpp={a.vpp}, ep={a.ep} for {model}: {exc}") from None
    if placement.gpus_per_node == 0:  # CPU trainer ranks: no TE, so no sequence parallelism for MoE at TP > 1
        try:
            check_moe_layout_for_training(arch, a.layout, sequence_parallel=False, where="CPU trainer ranks")
        except LayoutError as exc:
            raise ConfigError("actor_rollout_ref.actor.tp", str(exc)) from None
    length = d.max_prompt_length + d.max_response_length
    require(length <= arch.max_position_embeddings, "data",
            f"max_prompt_length + max_response_length = {d.max_prompt_length} + {d.max_response_length} = {length} "
            f"is more than {model}'s context of {arch.max_position_embeddings} tokens (max_position_embeddings)")
    dp = placement.trainer_world // (a.tp * a.pp)
    fill = dp * a.micro_pairs
    most = d.train_batch_size * max_pairs_per_prompt(cfg)
    require(most >= fill, "data.train_batch_size",
            f"{d.train_batch_size} prompts make at most {most} pair(s) per step, fewer than one micro-batch on every "
            f"data-parallel rank (DP {dp} × actor_rollout_ref.actor.micro_pairs {a.micro_pairs} = {fill}): raise "
            "data.train_batch_size or lower micro_pairs")
    if cfg.reward_model.type == RewardType.FUNCTION:
        try:
            resolve_function(cfg.reward_model.function)
        except RewardError as exc:
            raise ConfigError("reward_model.function", str(exc)) from None
