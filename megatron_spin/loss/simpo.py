"""SimPO (Meng et al. 2024): reference-free, length-normalised preference loss.

The implicit reward is the policy's average per-token log-prob, scaled by β::

    r_c = β log π(y_c) / len_c,      r_r = β log π(y_r) / len_r

and the loss is a logistic loss on the reward margin minus a target margin γ ≥ 0::

    loss = -log σ(r_c - r_r - γ) = -log σ(β (log π(y_c)/len_c - log π(y_r)/len_r) - γ)

This is TRL's CPO trainer convention for ``loss_type="simpo"`` (it subtracts γ/β from the
average-log-prob margin and multiplies by β, which is the same number).  As in TRL, label
smoothing ε applies the cDPO form to these logits:
``-(1-ε) log σ(z) - ε log σ(-z)`` with ``z = β m - γ``.  No reference model is used, so the
caller may skip the reference forward pass entirely.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def simpo_loss(
    chosen_avg_logps: torch.Tensor,
    rejected_avg_logps: torch.Tensor,
    beta: float,
    gamma: float = 0.0,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Per-pair SimPO loss from the per-token average log-probs of chosen and rejected."""
    logits = beta * (chosen_avg_logps - rejected_avg_logps) - gamma
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses
