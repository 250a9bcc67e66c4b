"""The preference objective: loss family and its coefficients."""

from __future__ import annotations

import dataclasses
from typing import Union

from megatron_spin.config.optim import ConfigError
from megatron_spin.loss.beta import resolve_beta
from megatron_spin.loss.checks import check_scalar
from megatron_spin.loss.types import LOSS_TYPES, SMOOTHABLE_LOSS_TYPES



@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss_type: str = "sigmoid"
    beta: Union[float, tuple[float, ...]] = 0.1  # a tuple: one β per SPIN iteration, last repeats
    label_smoothing: float = 0.0  # cDPO ε (sigmoid and simpo)
    simpo_gamma: float = 0.0
    nll_weight: float = 0.0  # RPO-style SFT term on the chosen response

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"algorithm.loss_type={self.loss_type!r} is not one of {LOSS_TYPES}")
        betas = self.beta if isinstance(self.beta, (tuple, list)) else (self.beta,)
        if not betas or any(b <= 0 for b in betas):
            raise ConfigError(f"algorithm.beta={self.beta!r}: every β must be > 0")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"algorithm.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if self.label_smoothing and self.loss_type not in SMOOTHABLE_LOSS_TYPES:
            raise ConfigError(f"algorithm.label_smoothing applies to sigmoid and simpo, not {self.loss_type!r}")
        if self.simpo_gamma and self.loss_type != "simpo":
            raise ConfigError(f"algorithm.simpo_gamma applies to simpo only, not {self.loss_type!r}")
        try:  # the loss module's own rules, checked at start-up rather than at the first step
            for i in range(len(betas)):
                resolve_beta(self.beta, i)
        except ValueError as e:
            raise ConfigError(f"algorithm.beta={self.beta!r}: {e}") from None
        for key in ("simpo_gamma", "nll_weight"):
            try:
                check_scalar(key, getattr(self, key), low=0.0)
            except ValueError as e:
                raise ConfigError(f"algorithm.{e}") from None
