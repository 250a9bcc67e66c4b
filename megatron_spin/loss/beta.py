"""β per SPIN iteration.

SPIN (Chen et al. 2024) runs several iterations, each with the previous iterate as the
reference, and may anneal β between them.  β is therefore a float (constant) or a sequence
``(β_0, β_1, ...)``: iteration ``t`` uses ``β_min(t, len-1)``, i.e. **the last value repeats**
for every iteration beyond the list, so a schedule never runs out.
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence, Union

BetaSpec = Union[float, Sequence[float]]


def _check_one(value: object, where: str) -> float:
    # bool is an int subclass; True as β is surely a config mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"beta: {where} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0.0:
        raise ValueError(f"beta: {where} must be finite and > 0, got {value!r}")
    return value


def resolve_beta(beta: BetaSpec, iteration: int = 0) -> float:
    """The β for SPIN iteration ``iteration`` (0-based); every entry is validated."""
    if isinstance(iteration, bool) or not isinstance(iteration, numbers.Integral) or iteration < 0:
        raise ValueError(f"iteration must be an integer >= 0, got {iteration!r}")
    if isinstance(beta, (list, tuple)):
        if len(beta) == 0:
            raise ValueError("beta: the per-iteration list is empty; give at least one value")
        values = [_check_one(b, f"beta[{i}]") for i, b in enumerate(beta)]
        return values[min(int(iteration), len(values) - 1)]
    return _check_one(beta, "beta")
