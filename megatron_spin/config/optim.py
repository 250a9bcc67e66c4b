"""Optimizer, learning-rate schedule and batch geometry of the actor update."""

from __future__ import annotations

import dataclasses
import math

_OPTIMIZERS = ("adam", "sgd")
_LR_STYLES = ("constant", "cosine", "linear")


class ConfigError(ValueError):
    """A configuration value breaks a rule; the message names the key."""


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: str = "adam"
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 1  # steps over which the decay style runs (≥ warmup)
    lr_decay_style: str = "constant"
    use_distributed_optimizer: bool = False

    def __post_init__(self) -> None:
        for key in ("lr", "min_lr", "clip_grad", "weight_decay", "adam_eps"):
            if not math.isfinite(getattr(self, key)):
                raise ConfigError(f"optim.{key}={getattr(self, key)} must be finite")
        if self.optimizer not in _OPTIMIZERS:
            raise ConfigError(f"optim.optimizer={self.optimizer!r} is not one of {_OPTIMIZERS}")
        if self.lr_decay_style not in _LR_STYLES:
            raise ConfigError(f"optim.lr_decay_style={self.lr_decay_style!r} is not one of {_LR_STYLES}")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"optim.lr={self.lr}, optim.min_lr={self.min_lr}: need 0 <= min_lr <= lr, lr > 0")
        if self.lr_warmup_steps < 0 or self.lr_decay_steps < max(1, self.lr_warmup_steps):
            raise ConfigError(
                f"optim.lr_decay_steps={self.lr_decay_steps} must be >= max(1, optim.lr_warmup_steps="
                f"{self.lr_warmup_steps})"
            )
        if self.clip_grad < 0:
            raise ConfigError(f"optim.clip_grad={self.clip_grad} must be >= 0")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Pairs per optimizer step, independent of the number of ranks.

    Each data-parallel rank processes ``global_pairs / dp`` pairs per step in micro-batches of
    ``micro_pairs`` pairs (a micro-batch holds its pairs' chosen and rejected sequences).
    """

    global_pairs: int = 8
    micro_pairs: int = 1

    def __post_init__(self) -> None:
        if self.global_pairs < 1 or self.micro_pairs < 1:
            raise ConfigError(
                f"batch.global_pairs={self.global_pairs}, batch.micro_pairs={self.micro_pairs}: both must be >= 1"
            )

    def micro_batches_per_rank(self, dp: int) -> int:
        if dp < 1:
            raise ConfigError(f"DP={dp} must be >= 1")
        if self.global_pairs % (self.micro_pairs * dp):
            raise ConfigError(
                f"rule batch.global_pairs % (batch.micro_pairs * DP) == 0 violated: "
                f"global_pairs={self.global_pairs}, micro_pairs={self.micro_pairs}, DP={dp}"
            )
        return self.global_pairs // (self.micro_pairs * dp)
