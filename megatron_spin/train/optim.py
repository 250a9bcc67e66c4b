"""Wrap model chunks for training: Megatron DDP, the Megatron optimizer and its LR schedule."""

from __future__ import annotations

from megatron_spin.train.config import OptimConfig


def wrap_ddp(chunks: list, use_distributed_optimizer: bool) -> list:
    """Megatron DDP around each chunk (contiguous grad buffers, DP all-reduce at the end)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_cfg = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    wrapped = [
        # Only the first virtual chunk buckets its grads (as Megatron-LM does): later chunks'
        # grads are reduced together at the end.
        DistributedDataParallel(config=c.config, ddp_config=ddp_cfg, module=c, disable_bucketing=i > 0)
        for i, c in enumerate(chunks)
    ]
    config = chunks[0].config
    # The schedules call these hooks: finish the DP grad reduction (and the tied-embedding
    # all-reduce between first and last PP stage) after the last micro-batch.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = [w.no_sync for w in wrapped] if len(wrapped) > 1 else wrapped[0].no_sync
    return wrapped


def build_optimizer(cfg: OptimConfig, ddp_chunks: list):
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tcfg = ddp_chunks[0].config
    opt_cfg = OptimizerConfig(
        optimizer=str(cfg.optimizer),
        lr=cfg.lr,
        min_lr=cfg.min_lr,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        adam_eps=cfg.adam_eps,
        sgd_momentum=cfg.sgd_momentum,
        clip_grad=cfg.clip_grad,
        use_distributed_optimizer=cfg.use_distributed_optimizer,
        params_dtype=tcfg.params_dtype,
        bf16=tcfg.bf16,
        fp16=tcfg.fp16,
    )
    optimizer = get_megatron_optimizer(opt_cfg, ddp_chunks)
    tcfg.grad_scale_func = optimizer.scale_loss
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0 if cfg.lr_warmup_steps else cfg.lr,
        max_lr=cfg.lr,
        min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_steps,
        lr_decay_steps=cfg.lr_decay_steps,
        lr_decay_style=str(cfg.lr_decay_style),  # plain: the schedule's state is checkpointed
        start_wd=cfg.weight_decay,
        end_wd=cfg.weight_decay,
        wd_incr_steps=1,
        wd_incr_style="constant",
    )
    if cfg.lr_warmup_steps:
        # Megatron's schedule is at step 0 (LR = init_lr = 0) until its first step() call; move
        # it to step 1 so the first update runs at lr/warmup rather than not at all.
        scheduler.step(increment=1)
    return optimizer, scheduler
