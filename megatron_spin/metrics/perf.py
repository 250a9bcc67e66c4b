"""Throughput, MFU and HFU of an actor update, from the batch and the measured time.

    perf/train_tokens     real (non-pad) tokens of the update: prompt + response, both sides
    perf/train_flops      model FLOPs (spec.flops): 3 forwards for the actor's forward + backward,
                          +1 for the reference log-probs, over the real tokens — recompute excluded
    perf/mfu              train_flops / (seconds × devices × peak per device)   (PaLM's MFU)
    perf/hfu              the same with what the hardware computed: padded tokens and the
                          recompute forward included (hardware FLOPs utilisation)
    perf/train_tokens_per_s_per_device

Sequence length for the attention term is the padded length (every row attends over it).
The peak comes from :mod:`megatron_spin.platform.peak` (a data sheet on GPUs, a measured
matmul on CPU hosts); without one, MFU/HFU are left out rather than guessed.
"""

from __future__ import annotations

from typing import Optional

from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.flops import model_flops_utilization, train_step_flops


def train_perf(arch: ModelArch, *, tokens: int, padded_tokens: int, seq_len: int, seconds: float, devices: int,
               peak_flops: Optional[float], recompute: bool, reference: bool) -> dict[str, float]:
    model = train_step_flops(arch, tokens, seq_len, recompute=False, reference=reference)
    hardware = train_step_flops(arch, padded_tokens, seq_len, recompute=recompute, reference=reference)
    seconds = max(seconds, 1e-9)
    out = {"perf/train_tokens": float(tokens), "perf/train_flops": model, "perf/devices": float(devices),
           "perf/train_tokens_per_s_per_device": tokens / seconds / devices,
           "perf/achieved_tflops_per_device": model / seconds / devices / 1e12}
    if peak_flops:
        out["perf/peak_flops_per_device"] = peak_flops
        out["perf/mfu"] = model_flops_utilization(model, seconds, devices, peak_flops)
        out["perf/hfu"] = model_flops_utilization(hardware, seconds, devices, peak_flops)
    return out
