"""``preference_loss``: one entry point for every DPO-family loss, per pair.

Inputs are per-sequence log-prob *sums* over response tokens (``[P]`` each, P pairs) from
the policy and, for the reference-based losses, from the frozen reference model.  The
function is pure: no parallelism, no collectives, no reduction over pairs (the caller
averages ``losses``).  Computation runs in at least float32 so that a bf16 input does not
quantise the margin; gradients flow back to the inputs' dtype.

Algorithm (DESIGN.md, "The algorithm, in one paragraph"), with
``Δ = (log π(y_c) - log π(y_r)) - (log π_ref(y_c) - log π_ref(y_r))``:

=========  ==================================================  =====================
loss_type  per-pair loss                                        implicit reward
=========  ==================================================  =====================
sigmoid    -(1-ε) log σ(βΔ) - ε log σ(-βΔ)   (ε=0: DPO)         β (log π - log π_ref)
ipo        (Δ̄ - 1/(2β))², Δ̄ = per-token Δ (TRL convention)     β (log π - log π_ref)
hinge      max(0, 1 - βΔ)                                       β (log π - log π_ref)
simpo      -log σ(β(log π_c/len_c - log π_r/len_r) - γ)         β log π / len
=========  ==================================================  =====================

plus ``nll_weight * (-log π(y_c) / len_c)`` when ``nll_weight > 0`` (RPO).  β is a float or
a per-SPIN-iteration list whose last value repeats (``beta.py``).  Formulas and the TRL
conventions they match are in ``dpo.py``, ``simpo.py`` and ``nll.py``.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_spin.loss.beta import BetaSpec, resolve_beta
from megatron_spin.loss.checks import (
    check_lengths,
    check_logps,
    check_loss_type,
    check_options,
    check_scalar,
)
from megatron_spin.loss.dpo import hinge_loss, ipo_loss, sigmoid_loss
from megatron_spin.loss.nll import chosen_nll
from megatron_spin.loss.simpo import simpo_loss
from megatron_spin.loss.types import REFERENCE_LOSS_TYPES, PreferenceLossOutput

# Loss types that divide by response lengths, and so need both of them.
_NEEDS_LENGTHS = ("ipo", "simpo")


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: Optional[torch.Tensor],
    ref_rejected_logps: Optional[torch.Tensor],
    *,
    beta: BetaSpec,
    loss_type: str,
    label_smoothing: float = 0.0,
    chosen_lengths: Optional[torch.Tensor] = None,
    rejected_lengths: Optional[torch.Tensor] = None,
    simpo_gamma: float = 0.0,
    nll_weight: float = 0.0,
    iteration: int = 0,
) -> PreferenceLossOutput:
    """Per-pair DPO-family loss and implicit rewards.

    Args:
        policy_chosen_logps, policy_rejected_logps: ``[P]`` policy log-prob sums (with grad).
        ref_chosen_logps, ref_rejected_logps: ``[P]`` reference log-prob sums; required for
            sigmoid/ipo/hinge, ignored by simpo (may be ``None`` there).  Treated as constants.
        beta: β > 0, or one β per SPIN iteration (the last repeats); see ``iteration``.
        loss_type: one of ``LOSS_TYPES`` = ("sigmoid", "ipo", "hinge", "simpo").
        label_smoothing: cDPO ε in [0, 0.5); sigmoid and simpo only.
        chosen_lengths, rejected_lengths: ``[P]`` response token counts (> 0); required by
            ipo and simpo; ``chosen_lengths`` also by ``nll_weight > 0``.
        simpo_gamma: SimPO target margin γ >= 0; simpo only.
        nll_weight: weight >= 0 of the chosen-response per-token NLL added to each pair.
        iteration: 0-based SPIN iteration, selects β from a list.

    Returns:
        :class:`PreferenceLossOutput` (``losses`` differentiable; rewards and nll detached).

    Raises:
        ValueError: naming the argument, for any invalid or inconsistent input.
    """
    loss_type = check_loss_type(loss_type)
    beta_t = resolve_beta(beta, iteration)
    label_smoothing = check_scalar("label_smoothing", label_smoothing, low=0.0, high=0.5)
    simpo_gamma = check_scalar("simpo_gamma", simpo_gamma, low=0.0)
    nll_weight = check_scalar("nll_weight", nll_weight, low=0.0)
    check_options(loss_type, label_smoothing, simpo_gamma)

    pc = check_logps("policy_chosen_logps", policy_chosen_logps, None)
    shape = pc.shape
    pr = check_logps("policy_rejected_logps", policy_rejected_logps, shape)
    needs_ref = loss_type in REFERENCE_LOSS_TYPES
    refs = {"ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    for name, value in refs.items():
        if value is None:
            if needs_ref:
                raise ValueError(f"{name} is required for loss_type={loss_type!r} (reference-based)")
        else:
            check_logps(name, value, shape)

    needs = {
        "chosen_lengths": loss_type in _NEEDS_LENGTHS or nll_weight > 0.0,
        "rejected_lengths": loss_type in _NEEDS_LENGTHS,
    }
    given = {"chosen_lengths": chosen_lengths, "rejected_lengths": rejected_lengths}
    for name, value in given.items():
        if value is None:
            if needs[name]:
                why = f"loss_type={loss_type!r}" if loss_type in _NEEDS_LENGTHS else f"nll_weight={nll_weight}"
                raise ValueError(f"{name} is required for {why} (per-token normalisation)")
        else:
            check_lengths(name, value, shape)

    # At least float32 (float64 stays float64, e.g. for gradcheck).
    dtype = torch.promote_types(pc.dtype, torch.float32)
    pc, pr = pc.to(dtype), pr.to(dtype)
    len_c = None if chosen_lengths is None else chosen_lengths.to(device=pc.device, dtype=dtype)
    len_r = None if rejected_lengths is None else rejected_lengths.to(device=pc.device, dtype=dtype)

    if needs_ref:
        # The reference is frozen: detaching makes that explicit even if a caller passes
        # tensors that still carry a graph.
        rc = ref_chosen_logps.detach().to(device=pc.device, dtype=dtype)
        rr = ref_rejected_logps.detach().to(device=pc.device, dtype=dtype)
        chosen_logratios, rejected_logratios = pc - rc, pr - rr
        if loss_type == "sigmoid":
            losses = sigmoid_loss(chosen_logratios - rejected_logratios, beta_t, label_smoothing)
        elif loss_type == "hinge":
            losses = hinge_loss(chosen_logratios - rejected_logratios, beta_t)
        else:  # ipo
            losses = ipo_loss(chosen_logratios / len_c - rejected_logratios / len_r, beta_t)
        chosen_rewards = beta_t * chosen_logratios.detach()
        rejected_rewards = beta_t * rejected_logratios.detach()
    else:  # simpo
        avg_c, avg_r = pc / len_c, pr / len_r
        losses = simpo_loss(avg_c, avg_r, beta_t, simpo_gamma, label_smoothing)
        chosen_rewards = beta_t * avg_c.detach()
        rejected_rewards = beta_t * avg_r.detach()

    nll = None
    if len_c is not None:
        nll_t = chosen_nll(pc, len_c)
        if nll_weight > 0.0:
            losses = losses + nll_weight * nll_t
        nll = nll_t.detach()

    return PreferenceLossOutput(losses, chosen_rewards, rejected_rewards, nll)
