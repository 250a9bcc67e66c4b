"""The optional SFT/NLL term on the chosen response (RPO, Pang et al. 2024).

DPO-family losses only constrain the *margin* between chosen and rejected, so both
log-probs can fall together; adding the chosen response's negative log-likelihood keeps the
chosen (in SPIN: the ground-truth) response likely.  Per pair::

    nll = -log π(y_c) / len_c            (mean NLL per chosen token)
    loss = preference_loss + nll_weight * nll

The per-token mean makes ``nll_weight`` independent of response length.  Note that TRL's
``sft`` loss term (DPOTrainer) and CPO's ``cpo_alpha`` NLL average over *all chosen tokens
of the batch* (token-weighted); the mean over pairs of this per-pair term weights every pair
equally instead.  The two agree when all chosen responses have the same length.
"""

from __future__ import annotations

import torch


def chosen_nll(policy_chosen_logps: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair mean NLL per chosen token, differentiable w.r.t. the policy log-probs."""
    return -policy_chosen_logps / chosen_lengths
