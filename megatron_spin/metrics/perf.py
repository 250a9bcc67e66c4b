"""Throughput and MFU of an actor update, from the batch's shape and the measured time.

    perf/train_flops      model FLOPs of the update (plan.flops: 3 forwards, +1 with recompute,
                          +1 for the reference log-probs) over the computed (padded) tokens
    perf/mfu              train_flops / (seconds × devices × peak per device)
    perf/train_tokens_per_s_per_device

The peak comes from :mod:`megatron_spin.platform.peak` (a data sheet on GPUs, a measured
matmul on CPU hosts); without one, MFU is left out rather than guessed.
"""

from __future__ import annotations

from typing import Optional

from megatron_spin.models.arch import ModelArch
from megatron_spin.plan.flops import model_flops_utilization, train_step_flops


def train_perf(arch: ModelArch, *, tokens: int, seq_len: int, seconds: float, devices: int,
               peak_flops: Optional[float], recompute: bool, reference: bool) -> dict[str, float]:
    flops = train_step_flops(arch, tokens, seq_len, recompute=recompute, reference=reference)
    seconds = max(seconds, 1e-9)
    out = {"perf/train_tokens": float(tokens), "perf/train_flops": flops, "perf/devices": float(devices),
           "perf/train_tokens_per_s_per_device": tokens / seconds / devices,
           "perf/achieved_tflops_per_device": flops / seconds / devices / 1e12}
    if peak_flops:
        out["perf/peak_flops_per_device"] = peak_flops
        out["perf/mfu"] = model_flops_utilization(flops, seconds, devices, peak_flops)
    return out
