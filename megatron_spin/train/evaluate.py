"""Preference metrics without an update: implicit-reward accuracy and loss on held-out pairs."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from megatron_spin.loss import preference_loss
from megatron_spin.loss.config import LossConfig


def preference_metrics(
    policy_logps: Optional[Sequence[torch.Tensor]],
    ref_logps: Optional[Sequence[torch.Tensor]],
    micro_batches: Sequence,
    loss_cfg: LossConfig,
    iteration: int = 0,
) -> dict[str, float]:
    """Mean loss, reward accuracy and margin over all pairs (last stage; ``{}`` elsewhere).

    Inputs are the per-micro-batch ``[2k]`` log-probs (chosen first) from
    ``forward_logps`` of the actor and the reference.
    """

    if policy_logps is None:
        return {}
    losses, acc, margin = [], [], []
    for i, (mb, logps) in enumerate(zip(micro_batches, policy_logps)):
        k = mb.num_pairs
        ref = ref_logps[i] if ref_logps is not None else torch.zeros_like(logps)
        lengths = mb.response_lengths.float().clamp(min=1)  # see step.py: no 0/0 on masked rows
        out = preference_loss(
            logps[:k], logps[k:], ref[:k], ref[k:], beta=loss_cfg.beta, loss_type=loss_cfg.loss_type,
            label_smoothing=loss_cfg.label_smoothing, chosen_lengths=lengths[:k], rejected_lengths=lengths[k:],
            simpo_gamma=loss_cfg.simpo_gamma, nll_weight=loss_cfg.nll_weight, iteration=iteration,
        )
        losses.append(out.losses)
        acc.append((out.chosen_rewards > out.rejected_rewards).float())
        margin.append(out.chosen_rewards - out.rejected_rewards)
    return {
        "loss": torch.cat(losses).mean().item(),
        "reward_accuracy": torch.cat(acc).mean().item(),
        "reward_margin": torch.cat(margin).mean().item(),
    }
