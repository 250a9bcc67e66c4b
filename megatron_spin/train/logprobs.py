"""Per-sequence response log-probs from a Megatron GPT model, vocab-parallel.

Megatron's ``GPTModel.forward(..., labels=...)`` returns the per-token cross entropy computed
with the vocab-parallel log-softmax (each TP rank holds ``V / TP`` logits; only max and
sum-exp are all-reduced), so the full-vocabulary logits never exist on any rank.  Log-probs
are minus that cross entropy.  Only the last pipeline stage has them.  A vocabulary padded for
TP (``parallel.layout.padded_vocab_size``) has its padded logits set to -inf by the model itself
(``models/vocab_padding.py``), so they add exp(-inf) = 0 to the sum-exp: HF's log-probs exactly.

Shift convention: ``labels[:, t] = tokens[:, t + 1]`` and ``loss_mask[:, t] = 1`` iff token
``t + 1`` is a response token, so masked positions are exactly the response predictions.
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_spin.models.forward import position_ids


def shifted_labels(tokens: torch.Tensor) -> torch.Tensor:
    """``[n, S]`` labels: the next token at each position (last column: a dummy 0, masked)."""
    return torch.cat([tokens[:, 1:], torch.zeros_like(tokens[:, :1])], dim=1)


def model_token_nll(model, tokens: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward with labels: ``[n, S]`` per-token NLL on the last stage, hidden states elsewhere.
    ``padding_mask`` (``[n, S]``, True at padding) keeps padding out of a MoE router's auxiliary loss."""
    extra = {} if padding_mask is None else {"padding_mask": padding_mask}
    return model(tokens, position_ids(tokens), attention_mask=None, labels=shifted_labels(tokens), **extra)


def sequence_logps(token_nll: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    """``[n]`` sums of response-token log-probs.

    A sum, never a mean over the mask: a sequence (or a whole rank's micro-batch) whose mask
    is all zero contributes 0 with finite gradients instead of 0/0 = NaN.
    """
    # where(), not a product: a non-finite NLL at a masked position must not leak in as 0·inf.
    keep = loss_mask.to(token_nll.device).bool()
    return -torch.where(keep, token_nll.float(), 0.0).sum(dim=-1)
