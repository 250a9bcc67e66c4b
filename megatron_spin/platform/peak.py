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

# Dense peak FLOP/s per GPU from vendor data sheets: (bf16/fp16, fp8, fp32 without TF32).
# Matched in order against torch's device name, so the specific variants come first.
_GPU_PEAKS = (
    ("H100 NVL", (835e12, 1671e12, 60e12)),
    ("H100 PCIe", (756e12, 1513e12, 51e12)),
    ("H200", (989.4e12, 1978.9e12, 67e12)),
    ("H100", (989.4e12, 1978.9e12, 67e12)),  # SXM
    ("A100", (312e12, None, 19.5e12)),
    ("L40S", (362e12, 733e12, 91.6e12)),
)


@functools.lru_cache(maxsize=4)
def peak_flops(dtype: str = "bfloat16", fp8: bool = False) -> tuple[Optional[float], str]:
    """(FLOP/s or None, where the number comes from).  The CUDA branch is unverified on GPU."""
    if current().is_cuda:  # pragma: no cover - GPU tier, unverified
        name = torch.cuda.get_device_name()
        for key, (half, eight, single) in _GPU_PEAKS:
            if key in name:
                if dtype == "float32":  # torch leaves TF32 matmuls off unless asked
                    return (half / 2 if torch.backends.cuda.matmul.allow_tf32 else single), f"{name} data sheet"
                return (eight if fp8 and eight else half), f"{name} data sheet"
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
