"""Input validation for :func:`megatron_spin.loss.preference_loss`.

Each check raises ``ValueError`` naming the offending argument.  Options that would be
silently ignored by the chosen loss type (label smoothing on hinge/IPO, γ outside SimPO)
are rejected too: a config that sets them almost certainly meant another loss.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from megatron_spin.loss.types import LOSS_TYPES, SMOOTHABLE_LOSS_TYPES


def check_loss_type(loss_type: object) -> str:
    if not isinstance(loss_type, str) or loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={loss_type!r} is not one of {LOSS_TYPES}")
    return loss_type


def check_scalar(name: str, value: object, *, low: float, high: Optional[float] = None) -> float:
    """A finite real in ``[low, high)`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a finite real number, got {value!r}")
    value = float(value)
    if value < low or (high is not None and value >= high):
        interval = f"[{low}, {high})" if high is not None else f">= {low}"
        raise ValueError(f"{name}={value} must be in {interval}")
    return value


def check_options(loss_type: str, label_smoothing: float, simpo_gamma: float) -> None:
    if label_smoothing != 0.0 and loss_type not in SMOOTHABLE_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing={label_smoothing} has no meaning for loss_type={loss_type!r}; "
            f"it applies to {tuple(sorted(SMOOTHABLE_LOSS_TYPES))} only"
        )
    if simpo_gamma != 0.0 and loss_type != "simpo":
        raise ValueError(f"simpo_gamma={simpo_gamma} is only used by loss_type='simpo', not {loss_type!r}")


def check_logps(name: str, value: object, shape: Optional[torch.Size]) -> torch.Tensor:
    """A 1-D floating tensor, of ``shape`` when given (the shape of ``policy_chosen_logps``)."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [P], got {type(value).__name__}")
    if value.dim() != 1:
        raise ValueError(f"{name} must have shape [P] (one entry per pair), got {tuple(value.shape)}")
    if not value.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if shape is not None and value.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but policy_chosen_logps has {tuple(shape)}; "
            "every input must be [P]"
        )
    return value


def check_lengths(name: str, value: object, shape: torch.Size) -> torch.Tensor:
    """Token counts ``[P]`` (integer or floating), all > 0 so that division is defined."""
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [P], got {type(value).__name__}")
    if value.shape != shape:
        raise ValueError(
            f"{name} has shape {tuple(value.shape)} but policy_chosen_logps has {tuple(shape)}; "
            "every input must be [P]"
        )
    if value.is_complex() or value.dtype == torch.bool:
        raise ValueError(f"{name} must hold token counts (integer or float), got {value.dtype}")
    # One host sync; a zero length would otherwise give inf/NaN losses far from the cause.
    if value.numel() and not bool((value > 0).all()):
        raise ValueError(f"{name} must be > 0 for every pair (token counts of the responses)")
    return value
