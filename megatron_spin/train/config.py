"""What the actor and reference ranks are configured with (``actor_rollout_ref.actor`` / ``.ref``).

The actor section holds the parallel layout, micro-batching, precision, recompute and the
optimizer; :class:`BatchConfig` is the batch geometry one update derives from the pairs it gets.
Every record validates itself when it is built and names the field it refuses.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

from megatron_spin.errors import ConfigError, coerce_enums, require
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.spec.precision import Precision


class Optimizer(enum.StrEnum):
    ADAM = "adam"
    SGD = "sgd"


class LRDecayStyle(enum.StrEnum):
    CONSTANT = "constant"
    COSINE = "cosine"
    LINEAR = "linear"


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    optimizer: Optimizer = Optimizer.ADAM
    lr: float = 1e-6
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    sgd_momentum: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping
    lr_warmup_steps: int = 0
    lr_decay_steps: int = 1  # steps over which the decay style runs (>= warmup)
    lr_decay_style: LRDecayStyle = LRDecayStyle.CONSTANT
    use_distributed_optimizer: bool = False  # shard optimizer state over data-parallel ranks

    def __post_init__(self) -> None:
        coerce_enums(self, optimizer=Optimizer, lr_decay_style=LRDecayStyle)
        for key in ("lr", "min_lr", "clip_grad", "weight_decay", "adam_eps"):
            require(math.isfinite(getattr(self, key)), key, f"must be finite, got {getattr(self, key)}")
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}], got {self.min_lr}")
        require(self.lr_warmup_steps >= 0, "lr_warmup_steps", f"must be >= 0, got {self.lr_warmup_steps}")
        require(self.lr_decay_steps >= max(1, self.lr_warmup_steps), "lr_decay_steps",
                f"must be >= max(1, lr_warmup_steps={self.lr_warmup_steps}), got {self.lr_decay_steps}")
        require(self.clip_grad >= 0, "clip_grad", f"must be >= 0, got {self.clip_grad}")
        require(not (self.use_distributed_optimizer and self.optimizer == Optimizer.SGD), "use_distributed_optimizer",
                "megatron-core's distributed optimizer supports adam only (optimizer=sgd)")


@dataclasses.dataclass(frozen=True)
class BatchConfig:
    """Pairs per optimizer step, independent of the number of ranks.

    Each data-parallel rank processes ``global_pairs / dp`` pairs per step in micro-batches of
    ``micro_pairs`` pairs (a micro-batch holds its pairs' chosen and rejected sequences).
    """

    global_pairs: int = 8
    micro_pairs: int = 1

    def __post_init__(self) -> None:
        require(self.global_pairs >= 1, "global_pairs", f"must be >= 1, got {self.global_pairs}")
        require(self.micro_pairs >= 1, "micro_pairs", f"must be >= 1, got {self.micro_pairs}")

    def micro_batches_per_rank(self, dp: int) -> int:
        require(dp >= 1, "dp", f"must be >= 1, got {dp}")
        if self.global_pairs % (self.micro_pairs * dp):
            raise ConfigError("global_pairs", f"rule global_pairs % (micro_pairs * DP) == 0 violated: global_pairs="
                                              f"{self.global_pairs}, micro_pairs={self.micro_pairs}, DP={dp}")
        return self.global_pairs // (self.micro_pairs * dp)


@dataclasses.dataclass(frozen=True)
class ActorConfig:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline chunks per PP rank (interleaved schedule)
    ep: int = 1  # expert parallelism (MoE models): experts split over EP data-parallel ranks
    # Weight of Megatron's MoE load-balancing loss in the update (MoE models; 0: none, the router
    # learns from the preference loss alone).
    moe_aux_loss_coeff: float = 0.0
    micro_pairs: int = 1  # pairs per micro-batch
    precision: Precision = Precision()
    recompute: bool = False  # full activation recompute
    optim: OptimConfig = OptimConfig()

    def __post_init__(self) -> None:
        for key in ("tp", "pp", "ep", "micro_pairs"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(math.isfinite(self.moe_aux_loss_coeff) and self.moe_aux_loss_coeff >= 0, "moe_aux_loss_coeff",
                f"must be finite and >= 0, got {self.moe_aux_loss_coeff}")
        require(self.vpp is None or self.vpp >= 1, "vpp", f"must be >= 1 or null, got {self.vpp}")

    @property
    def layout(self) -> ParallelLayout:
        return ParallelLayout(tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep)


@dataclasses.dataclass(frozen=True)
class RefConfig:
    offload: bool = False  # keep the reference on the host between uses (GPU only)
