"""The frozen reference model: log-probs once per batch, refreshed from the actor in memory.

The reference has the actor's architecture and parallel layout, so a refresh is a local
parameter-by-parameter copy on every rank (no communication, no disk) and is exact.
With ``offload=True`` its weights live in host memory between uses and visit the device
only for the reference pass (at 70B, device memory is what runs out).  On a CPU-only
machine host and device are the same memory, so offload changes nothing there.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_spin import platform
from megatron_spin.ckpt.model_io import load_model_weights
from megatron_spin.spec.arch import ModelArch
from megatron_spin.models.builder import build_model
from megatron_spin.spec.precision import Precision
from megatron_spin.parallel.groups import ParallelContext
from megatron_spin.train import step


class Reference:
    def __init__(self, chunks: list, offload: bool = False):
        self.chunks = chunks
        for c in chunks:
            c.requires_grad_(False)
            c.eval()
        self.offload = offload and platform.current().is_cuda
        self._device = next(chunks[0].parameters()).device
        if self.offload:
            self._to("cpu")

    @classmethod
    def build(
        cls,
        arch: ModelArch,
        pctx: ParallelContext,
        *,
        precision: Precision = Precision(),
        init_from: Optional[str] = None,
        offload: bool = False,
    ) -> "Reference":
        chunks = build_model(arch, pctx, precision, init_weights=init_from is None)
        if init_from is not None:
            load_model_weights(chunks, init_from)
        return cls(chunks, offload=offload)

    def _to(self, device) -> None:
        for c in self.chunks:
            for p in c.parameters():
                # pinned host memory makes the next host-to-device copy asynchronous-capable
                p.data = p.data.to(device) if device != "cpu" else p.data.cpu().pin_memory()

    @torch.no_grad()
    def logps(self, micro_batches: Sequence) -> Optional[list[torch.Tensor]]:
        if self.offload:
            self._to(self._device)
        try:
            return step.forward_logps(self.chunks, micro_batches)
        finally:
            if self.offload:
                self._to("cpu")

    @torch.no_grad()
    def refresh_from(self, actor_modules: list) -> None:
        """Copy the actor's current weights (same layout) into the reference, exactly."""
        for ref, act in zip(self.chunks, actor_modules, strict=True):
            ref_params = dict(ref.named_parameters())
            act_params = dict(act.named_parameters())
            if ref_params.keys() != act_params.keys():
                raise RuntimeError("reference and actor chunks differ in structure")
            for name, p in ref_params.items():
                p.copy_(act_params[name].detach().to(p.device, p.dtype))
