"""Linear layers that multiply weight-first on the CPU: ``y = (W xᵀ)ᵀ`` instead of ``x Wᵀ``.

``torch.nn.functional.linear`` hands MKL ``x [M, K] @ W [N, K]ᵀ``; for the few rows of a decode
step (M = the batch) a profile of the engine shows MKL copying the transposed weight into its
packed layout on every call (``sgemm_scopy``: as many samples as the multiply kernel itself).
Asking for ``W [N, K] @ xᵀ [K, M]`` instead (the same product, transposed) takes MKL's other
path, which streams the weight in its stored order.  Measured on this
2-core machine (fp32, 2 threads; ``benchmarks/cpu_linear.py`` prints the per-layer figures):

    SmolLM2-135M LM head (49152 x 576)     M=16: x Wᵀ 28-35 ms, W xᵀ 17-22 ms
    the embedded engine, 8 prompts x 2 samples x 32 tokens: 5.1-5.5 s -> 3.9-4.1 s

(small projections alone gain little or lose a few µs of Python per call; in the model, with
``[b, 1, K]`` inputs, orienting every layer beat orienting the LM head alone, 4.9-5.5 s.)

The result is a transposed view (``[M, N]`` with strides ``(1, M)``); the reshapes HF models apply
to projections (split heads, add a sequence dimension) are views of it.  Sums are taken in a
different order, so outputs differ from ``F.linear`` in the last bits, as any two GEMM kernels do.
Beyond ``MAX_ROWS`` rows (a long prefill) the layer calls ``F.linear``: orientation was measured
up to there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_ROWS = 1024


class WeightFirstLinear(torch.nn.Linear):
    """``nn.Linear`` with the same parameters and names, multiplying weight-first (module doc)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // max(1, self.in_features)
        if x.dim() < 1 or rows == 0 or rows > MAX_ROWS or x.device.type != "cpu":
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features)  # [M, K]
        y = torch.mm(self.weight, flat.t()).t()  # [M, N], a transposed view of [N, M]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)


def orient_linears(model: torch.nn.Module) -> int:
    """Make every plain ``nn.Linear`` of ``model`` a :class:`WeightFirstLinear` in place (its
    parameters, their names and any weight tying stay as they are); returns how many changed.
    Subclasses of ``nn.Linear`` (quantised or fused layers) keep their own forward."""
    changed = 0
    for module in model.modules():
        if type(module) is torch.nn.Linear:
            module.__class__ = WeightFirstLinear
            changed += 1
    return changed
