"""The actor: the policy being trained, on Megatron with TP/PP, DDP and the Megatron optimizer.

    actor = Actor.build(arch, pctx, optim_cfg, loss_cfg, init_from=megatron_dir)
    metrics = actor.train_step(micro_batches, ref_logps)

One ``train_step`` is one optimizer step on ``len(micro_batches)`` micro-batches of this
data-parallel rank (gradient accumulation); see :mod:`megatron_spin.train.step`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_spin.ckpt.model_io import load_model_weights
from megatron_spin.loss.config import LossConfig
from megatron_spin.train.config import OptimConfig
from megatron_spin.spec.arch import ModelArch
from megatron_spin.models.builder import build_model, check_moe_training, sequence_multiple
from megatron_spin.spec.precision import Precision
from megatron_spin.parallel.groups import ParallelContext
from megatron_spin.train import step
from megatron_spin.train.optim import build_optimizer, wrap_ddp


@dataclasses.dataclass
class Actor:
    arch: ModelArch
    pctx: ParallelContext
    chunks: list  # DDP-wrapped GPTModel chunks
    optimizer: object
    scheduler: object
    loss_cfg: LossConfig
    steps: int = 0

    @classmethod
    def build(
        cls,
        arch: ModelArch,
        pctx: ParallelContext,
        optim_cfg: OptimConfig,
        loss_cfg: LossConfig,
        *,
        precision: Precision = Precision(),
        init_from: Optional[str] = None,
        recompute: bool = False,
        moe_aux_loss_coeff: float = 0.0,
    ) -> "Actor":
        check_moe_training(arch, pctx.layout)
        chunks = build_model(arch, pctx, precision, recompute=recompute, init_weights=init_from is None,
                             moe_aux_loss_coeff=moe_aux_loss_coeff)
        if init_from is not None:
            load_model_weights(chunks, init_from)
        ddp = wrap_ddp(chunks, optim_cfg.use_distributed_optimizer)
        optimizer, scheduler = build_optimizer(optim_cfg, ddp)
        return cls(arch, pctx, ddp, optimizer, scheduler, loss_cfg)

    def sequence_multiple(self, precision: Precision) -> int:
        """What this actor's training sequences are padded to a multiple of (FP8, sequence parallelism)."""
        return sequence_multiple(self.arch, self.pctx.layout, precision)

    @property
    def modules(self) -> list:
        """The GPTModel chunks inside the DDP wrappers."""
        return [c.module for c in self.chunks]

    def logps(self, micro_batches: Sequence) -> Optional[list[torch.Tensor]]:
        return step.forward_logps(self.chunks, micro_batches)

    def train_step(
        self, micro_batches: Sequence, ref_logps: Optional[Sequence[torch.Tensor]], iteration: int = 0
    ) -> dict[str, float]:
        """Forward/backward over all micro-batches, one optimizer step, one LR-schedule step.

        Metrics are means over the real pairs of the whole batch (padding pairs excluded), on the
        last pipeline stage; every rank gets grad norm and LR.
        """
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        per_micro = step.preference_forward_backward(self.chunks, micro_batches, ref_logps, self.loss_cfg, iteration)
        ok, grad_norm, _ = self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        if ok:  # a skipped (fp16 overflow) update does not advance the schedule
            self.scheduler.step(increment=1)
            self.steps += 1
        # grad_norm is None (fp32) or 0 (mixed precision) when clipping is off: report NaN then.
        metrics = {"grad_norm": float(grad_norm) if grad_norm else float("nan"),
                   "lr": float(lr), "update_skipped": float(not ok)}
        if per_micro:
            keys = sorted(per_micro[0])
            # One stack and one all-reduce on the device (NCCL needs device tensors), one host copy.
            sums = torch.stack([torch.stack([m[k].float() for k in keys]) for m in per_micro]).sum(dim=0)
            if self.pctx.dp_size > 1:
                dist.all_reduce(sums, group=self.pctx.dp_group)
            totals = dict(zip(keys, sums.cpu().tolist()))
            real = totals.pop("pairs")
            metrics.update({k: v / real for k, v in totals.items()})  # means over the real pairs
            metrics["response_tokens"] = totals["response_tokens"]  # a total: the whole global batch
            metrics["pairs"] = real
        return metrics
