"""Save and resume the actor's training state bit-exactly: weights, optimizer, LR schedule, steps.

    save_train_state(actor, ref, directory)     # collective
    load_train_state(actor, ref, directory)     # collective, same layout and ranks

Layout: ``actor/`` and ``reference/`` are layout-free model checkpoints (``ckpt.model_io``);
``optim/`` is a Megatron dist checkpoint of the optimizer's *sharded* state dict, the way
Megatron-LM saves it — for the DistributedOptimizer the only way, since its ``state_dict()``
leaves the per-parameter state (fp32 main params, Adam moments) out: a resume from it starts
from uninitialised moments and, in bf16, from stale main params that revert the model.
``optim/common.pt`` holds the schedule, the step count and the layout; ``rng/`` each rank's RNG.
Every file is read as data (``ckpt.safe_load``): a crafted checkpoint is refused, never run.

What it takes on megatron-core 0.16.1 (each reproduced; the resume tests fail without it):
  * the DistributedOptimizer needs ``distrib_optim_sharding_type=dp_reshardable`` (the default
    fails: "flattened_range is not supported"); it reshards over DP only;
  * an optimizer without state (before its first update) is seeded with step 0 and zero moments —
    what the first step would create — or the save asserts and the load state dict lacks keys;
  * the load runs under ``torch.no_grad()`` (fp32 main shards are views of leaf params);
  * the DistributedOptimizer's load leaves one shared, zeroed ``step``: each parameter gets the
    saved step back from the param group (else Adam's bias correction restarts);
  * ``OptimizerParamScheduler.load_state_dict`` *adds* the saved step count: reset it first;
  * the bf16 plain optimizer's own sharded state dict mis-maps models whose params are not all
    float16 (torch RMSNorm weights stay fp32): mapped here param by param;
  * no ``reload_model_params()`` after the load — it would replace the restored fp32 main params
    by their bf16 rounding;
  * a MoE model's optimizer is a chain of two (dense parameters over DP, experts over expert-DP):
    each member's sharded state goes under its index with Megatron's ``chained_<i>.`` key prefix,
    and each is prepared and restored on its own.

The per-parameter step handling is torch Adam's (what megatron-core builds without TE or apex);
TE/apex ``FusedAdam`` keeps its step in the param group and only gets zero moments seeded
(unverified on GPU: the GPU check runs without TE).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_spin.ckpt.model_io import load_model_weights, save_model_weights, sharded_model_state
from megatron_spin.ckpt.safe_load import load_checkpoint_object
from megatron_spin.ckpt.run_state import ACTOR_SUBDIR

SHARDING = {"distrib_optim_sharding_type": "dp_reshardable"}  # each DP rank writes its own bucket shards


class ResumeError(RuntimeError):
    pass


def _members(optimizer) -> list:
    """The MegatronOptimizers inside (``get_megatron_optimizer`` returns a ChainedOptimizer)."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _adam(inner) -> bool:
    """torch's Adam/AdamW (megatron-core's choice without TE or apex: CPU): one ``step`` per parameter."""
    return isinstance(inner, (torch.optim.Adam, torch.optim.AdamW))


def _fused_adam(inner) -> bool:
    """TE's or apex's FusedAdam (megatron-core's choice whenever either imports: a GPU install with
    TE).  Its step lives in the parameter group, which the saved param groups carry; only the
    moments need seeding, as Megatron's own ``init_state_fn`` does."""
    cls = type(inner)
    return cls.__name__ == "FusedAdam" and cls.__module__.split(".")[0] in ("transformer_engine", "apex")


def _seed_state(optimizer) -> None:
    """Step 0 and zero moments for every parameter without state (exactly Adam's first-step
    initialisation; SGD's momentum buffer likewise), never touching a parameter."""
    for member in _members(optimizer):
        inner = member.optimizer
        if inner is None:
            continue
        if getattr(member, "init_state_fn", None) is None:  # SGD: 0.16.1 leaves it None and then calls it
            member.init_state_fn = lambda opt, config=None: None
        if _fused_adam(inner):  # unverified on GPU: zero moments for parameters without state
            member.init_state_fn(inner, member.config)
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if state:
                    continue
                if _adam(inner):
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                    if group.get("amsgrad"):
                        state["max_exp_avg_sq"] = torch.zeros_like(p)
                elif group.get("momentum", 0):
                    state["momentum_buffer"] = torch.zeros_like(p)


def _float16_sharded_state(member, model_sd: dict, is_loading: bool) -> dict:
    """The bf16/fp16 plain optimizer's sharded state, each optimizer-state id mapped to its own model
    param (its fp32 main copy -> the float16 param; an fp32 param -> itself); ``fp32_from_fp16_params``
    as a dict of dicts (dist_checkpointing's split mangles a list holding an empty group)."""
    from megatron.core.dist_checkpointing.optimizer import (
        get_param_id_to_sharded_param_map,
        make_sharded_optimizer_tensor,
        optim_state_to_sharding_state,
    )

    if is_loading:
        member.init_state_fn(member.optimizer, member.config)
    sd = member.state_dict()
    main_to_model = {id(main): model for models, mains in zip(member.float16_groups, member.fp32_from_float16_groups)
                     for model, main in zip(models, mains)}
    params = [p for g in member.optimizer.param_groups for p in g["params"]]  # state-id order
    id_map = get_param_id_to_sharded_param_map(model_sd, [main_to_model.get(id(p), p) for p in params])
    index = {id(p): i for i, p in enumerate(params)}
    sd["fp32_from_fp16_params"] = {
        g: {i: make_sharded_optimizer_tensor(id_map[index[id(main)]], main, prefix="optimizer.state.fp32_param")
            for i, main in enumerate(mains)}
        for g, mains in enumerate(member.fp32_from_float16_groups)}
    step = member._extract_common_per_param_step(sd["optimizer"])
    optim_state_to_sharding_state(sd["optimizer"], id_map, exclude_keys=("step",))
    if step is not None:
        sd["optimizer"]["state"]["common_step"] = step
    return sd


def _optimizer_sharded_state(actor, is_loading: bool) -> dict:
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    model_sd = sharded_model_state(actor.modules)  # the GPTModel chunks: DDP would prefix "module."

    def one(member):
        if isinstance(member, Float16OptimizerWithFloat16Params):
            return _float16_sharded_state(member, model_sd, is_loading)
        return member.sharded_state_dict(model_sd, is_loading=is_loading, metadata=SHARDING)

    members = _members(actor.optimizer)
    if len(members) == 1:  # a dense model: one optimizer, its state dict as it is
        return one(members[0])
    from megatron.core.dist_checkpointing.utils import add_prefix_for_sharding

    actor.optimizer._synchronize_steps()  # as ChainedOptimizer.sharded_state_dict does (FusedAdam's group step)

    chained = {}
    for i, member in enumerate(members):  # MoE: dense and expert optimizers, as ChainedOptimizer keys them
        chained[i] = one(member)
        add_prefix_for_sharding(chained[i], f"chained_{i}.")
    return chained


def _prepare_loaded(actor, loaded: dict) -> None:
    """What each optimizer's ``load_state_dict`` expects from the loaded sharded dict."""
    members = _members(actor.optimizer)
    if len(members) == 1:
        _prepare_member(members[0], loaded)
    else:
        for i, member in enumerate(members):
            _prepare_member(member, loaded[i])


def _prepare_member(member, loaded: dict) -> None:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if isinstance(member, DistributedOptimizer) or member.optimizer is None:
        return
    fp = loaded.get("fp32_from_fp16_params")
    if isinstance(fp, dict):  # back to Megatron's list of lists
        loaded["fp32_from_fp16_params"] = [[fp[g][i] for i in range(len(mains))]
                                           for g, mains in enumerate(member.fp32_from_float16_groups)]
    inner = loaded["optimizer"] if "fp32_from_fp16_params" in loaded else loaded
    if _adam(member.optimizer) and inner["state"] and "common_step" not in inner["state"]:
        inner["state"]["common_step"] = torch.tensor(0.0)  # saved before the first update: none was written


def _restore_steps(optimizer) -> None:
    """One ``step`` tensor per parameter, holding the saved step (see the module docstring)."""
    for member in _members(optimizer):
        inner = member.optimizer
        if inner is None or not _adam(inner):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state.get(p)
                if not state:
                    continue
                if "step" in group:  # DistributedOptimizer: the saved step is the group's
                    state["step"] = torch.tensor(float(group["step"]))
                elif "step" not in state:
                    state["step"] = torch.tensor(0.0)
                elif torch.is_tensor(state["step"]):
                    state["step"] = state["step"].detach().clone()


def _layout_id(layout) -> str:
    """The layout as checkpoints record it: the dataclass repr from before EP existed, with ``ep=``
    only when EP > 1, so that checkpoints saved before then resume (the comparison is textual)."""
    text = f"ParallelLayout(tp={layout.tp}, pp={layout.pp}, vpp={layout.vpp})"
    return text if layout.ep == 1 else f"{text[:-1]}, ep={layout.ep})"


def save_train_state(actor, reference, directory: str | os.PathLike) -> None:
    """Collective: every rank of the trainer calls it with the same directory."""
    from megatron.core import dist_checkpointing

    directory = Path(directory)
    save_model_weights(actor.modules, directory / ACTOR_SUBDIR)
    if reference is not None:
        save_model_weights(reference.chunks, directory / "reference")
    _seed_state(actor.optimizer)
    (directory / "optim").mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save({
        "optimizer": _optimizer_sharded_state(actor, is_loading=False),
        "scheduler": actor.scheduler.state_dict(),  # plain values (build_optimizer passes str)
        "steps": actor.steps,
        "layout": {"layout": _layout_id(actor.pctx.layout), "world_size": actor.pctx.world_size},
    }, str(directory / "optim"))
    (directory / "rng").mkdir(exist_ok=True)
    torch.save(torch.get_rng_state(), directory / "rng" / f"rank_{actor.pctx.rank:05d}.pt")
    dist.barrier()


def load_train_state(actor, reference, directory: str | os.PathLike) -> None:
    """Collective inverse of :func:`save_train_state`, at the layout and world size it was saved
    with (the weights alone reshard freely; the optimizer state does not)."""
    from megatron_spin.ckpt.dist_load import load_dist_checkpoint

    directory = Path(directory)
    common = load_checkpoint_object(directory / "optim" / "common.pt")
    here = {"layout": _layout_id(actor.pctx.layout), "world_size": actor.pctx.world_size}
    if common.get("layout") != here:
        raise ResumeError(f"{directory} was saved at {common.get('layout')}; this run is {here}: the optimizer state "
                          "resumes at the same layout and number of ranks")
    load_model_weights(actor.modules, directory / ACTOR_SUBDIR)
    if reference is not None:
        load_model_weights(reference.chunks, directory / "reference")
    _seed_state(actor.optimizer)
    with torch.no_grad():
        loaded = load_dist_checkpoint({"optimizer": _optimizer_sharded_state(actor, is_loading=True)},
                                      directory / "optim")
        _prepare_loaded(actor, loaded["optimizer"])
        actor.optimizer.load_state_dict(loaded["optimizer"])
    _restore_steps(actor.optimizer)
    actor.scheduler.num_steps = 0  # load_state_dict adds the saved count to the current one
    actor.scheduler.load_state_dict(loaded["scheduler"])
    actor.steps = loaded["steps"]
    torch.set_rng_state(load_checkpoint_object(directory / "rng" / f"rank_{actor.pctx.rank:05d}.pt"))

