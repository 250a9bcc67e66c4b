"""Reference-based DPO-family losses on the per-pair margin.

Notation, per pair (chosen c, rejected r), with sequence log-prob sums ``log π(y)``::

    h_c = log π(y_c) - log π_ref(y_c)          (chosen log-ratio)
    h_r = log π(y_r) - log π_ref(y_r)          (rejected log-ratio)
    Δ   = h_c - h_r = (log π(y_c) - log π(y_r)) - (log π_ref(y_c) - log π_ref(y_r))

Losses (β > 0):

* sigmoid (DPO, Rafailov et al. 2023):  ``-log σ(βΔ)``.
  With label smoothing ε ∈ [0, 0.5) it is conservative DPO (cDPO, Mitchell 2023): the label
  is assumed flipped with probability ε, giving the cross-entropy against (1-ε, ε):
  ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)``.  (This is *not* TRL's ``robust`` loss, which divides
  by 1-2ε and subtracts the flipped term.)
* hinge (SLiC-style):  ``max(0, 1 - βΔ)``.
* ipo (Azar et al. 2023, eq. 17, β playing τ):  ``(Δ̄ - 1/(2β))²`` where Δ̄ is the
  **per-token** margin ``h_c / len_c - h_r / len_r``.  The squared loss on token-summed
  log-ratios grows with response length, so TRL (DPOTrainer ``loss_type="ipo"``, and CPO)
  averages the log-ratios over completion tokens; its authors report this is the form
  behind the IPO paper's results.  We follow TRL, so IPO needs both lengths.

Implicit rewards for logging are ``β h_c`` and ``β h_r`` (token sums, for IPO too, as in TRL).
All losses use ``F.logsigmoid``/``relu`` so that large |βΔ| neither overflows nor loses the
gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sigmoid_loss(delta: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO ``-log σ(βΔ)``, or cDPO ``-(1-ε) log σ(βΔ) - ε log σ(-βΔ)`` when ε > 0."""
    logits = beta * delta
    losses = -F.logsigmoid(logits)
    if label_smoothing > 0.0:
        # logσ(-x) rather than log(1-σ(x)): the latter is -inf once σ(x) rounds to 1.
        losses = (1.0 - label_smoothing) * losses - label_smoothing * F.logsigmoid(-logits)
    return losses


def hinge_loss(delta: torch.Tensor, beta: float) -> torch.Tensor:
    """``max(0, 1 - βΔ)``: zero (and zero gradient) once the scaled margin reaches 1."""
    return torch.relu(1.0 - beta * delta)


def ipo_loss(delta_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """``(Δ̄ - 1/(2β))²`` on the per-token margin Δ̄ (see the module docstring)."""
    return (delta_per_token - 1.0 / (2.0 * beta)) ** 2
