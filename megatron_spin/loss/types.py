"""The result of a preference loss: per-pair losses plus the implicit rewards to log.

Every field is a tensor of shape ``[P]`` (one entry per (chosen, rejected) pair) so that
callers choose the reduction (mean over a micro-batch, weighting by tokens, ...) and the
metrics they log; nothing here is reduced or gathered.
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, NamedTuple, Optional

if TYPE_CHECKING:  # annotations only: the config imports this module and must not need torch
    import torch


class LossType(enum.StrEnum):
    """The loss families ``preference_loss`` knows (members compare equal to their names)."""

    SIGMOID = "sigmoid"  # DPO; with label smoothing, cDPO
    IPO = "ipo"
    HINGE = "hinge"
    SIMPO = "simpo"  # reference-free, length-normalised


LOSS_TYPES: tuple[str, ...] = tuple(t.value for t in LossType)  # the first is the default everywhere

# Loss types that compare the policy with a reference model.  SimPO is reference-free.
REFERENCE_LOSS_TYPES: frozenset[str] = frozenset({LossType.SIGMOID, LossType.IPO, LossType.HINGE})

# Loss types whose form is logistic, so that cDPO-style label smoothing has a meaning.
SMOOTHABLE_LOSS_TYPES: frozenset[str] = frozenset({LossType.SIGMOID, LossType.SIMPO})


class PreferenceLossOutput(NamedTuple):
    """Per-pair outputs of :func:`megatron_spin.loss.preference_loss`.

    losses: ``[P]``, differentiable; the preference term plus ``nll_weight * nll`` when the
        NLL term is on.  Reduce it yourself (the trainer takes the mean).
    chosen_rewards / rejected_rewards: ``[P]``, detached implicit rewards:
        ``β (log π - log π_ref)`` for the DPO family, ``β log π / len`` for SimPO.
    nll: ``[P]`` detached per-token NLL of the chosen response, ``-log π(y_c) / len_c``,
        whenever ``chosen_lengths`` was given (a useful metric even with ``nll_weight=0``);
        ``None`` otherwise.
    """

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    nll: Optional[torch.Tensor] = None
