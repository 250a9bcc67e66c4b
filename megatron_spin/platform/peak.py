"""The peak dense matmul rate of this process's device: the denominator of MFU.

CUDA: the vendor's dense (no sparsity) tensor-core peak for the training dtype, looked up by
device name; an unknown GPU has no peak (MFU is then not logged rather than made up).
CPU: there is no published peak for a shared host, so the rate of a square fp32 matmul is
measured once per process (best of a few repetitions) — MFU on CPU is "fraction of what
this host's BLAS achieves on a large matmul", and is labelled so in the metrics.
"""

from __future__ import annotations

import functools
import time
from typing import Optional

import torch

from megatron_spin.platform import current

# Dense peak FLOP/s per GPU (vendor data sheets, SXM parts): (bf16/fp16, fp8).
_GPU_PEAKS = {
    "H200": (989.4e12, 1978.9e12),
    "H100": (989.4e12, 1978.9e12),  # SXM; the PCIe part is lower (756 / 1513 TFLOP/s)
    "A100": (312e12, None),
    "L40S": (362e12, 733e12),
}


@functools.lru_cache(maxsize=4)
def peak_flops(dtype: str = "bfloat16", fp8: bool = False) -> tuple[Optional[float], str]:
    """(FLOP/s or None, where the number comes from)."""
    if current().is_cuda:  # pragma: no cover - GPU tier
        name = torch.cuda.get_device_name()
        for key, (half, eight) in _GPU_PEAKS.items():
            if key in name:
                if "PCIe" in name and key == "H100":
                    half, eight = 756e12, 1513e12
                peak = eight if fp8 and eight else half
                return (peak / 2 if dtype == "float32" else peak), f"{name} data sheet"
        return None, f"{name}: unknown peak"
    return _measured_cpu_matmul(), "measured fp32 matmul on this host"


def _measured_cpu_matmul(n: int = 1024, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: BLAS thread pool, caches
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best
