"""The preference objective a run trains with: loss family and coefficients (``algorithm.loss``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Union

from megatron_spin.errors import ConfigError, coerce_enums, require
from megatron_spin.loss.beta import resolve_beta
from megatron_spin.loss.types import REFERENCE_LOSS_TYPES, SMOOTHABLE_LOSS_TYPES, LossType


@dataclasses.dataclass(frozen=True)
class LossConfig:
    loss_type: LossType = LossType.SIGMOID
    beta: Union[float, tuple[float, ...]] = 0.1  # a tuple: one β per SPIN iteration, the last repeats
    label_smoothing: float = 0.0  # cDPO ε (sigmoid and simpo)
    simpo_gamma: float = 0.0  # SimPO target margin
    nll_weight: float = 0.0  # RPO-style SFT term on the chosen response

    def __post_init__(self) -> None:
        coerce_enums(self, loss_type=LossType)
        try:  # the loss module's own rule, checked at start-up rather than at the first step
            betas = self.beta if isinstance(self.beta, (tuple, list)) else (self.beta,)
            for i in range(max(1, len(betas))):
                resolve_beta(self.beta, i)
        except ValueError as exc:
            raise ConfigError("beta", str(exc).removeprefix("beta: ")) from None
        require(math.isfinite(self.label_smoothing) and 0.0 <= self.label_smoothing < 0.5, "label_smoothing",
                f"must be in [0, 0.5), got {self.label_smoothing}")
        require(not self.label_smoothing or self.loss_type in SMOOTHABLE_LOSS_TYPES, "label_smoothing",
                f"applies to sigmoid and simpo, not {str(self.loss_type)!r}")
        require(math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0, "simpo_gamma",
                f"must be >= 0, got {self.simpo_gamma}")
        require(not self.simpo_gamma or self.loss_type == LossType.SIMPO, "simpo_gamma",
                f"applies to simpo only, not {str(self.loss_type)!r}")
        require(math.isfinite(self.nll_weight) and self.nll_weight >= 0, "nll_weight",
                f"must be >= 0, got {self.nll_weight}")

    @property
    def needs_reference(self) -> bool:
        return self.loss_type in REFERENCE_LOSS_TYPES
