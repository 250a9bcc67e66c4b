"""Keep a padded vocabulary's extra rows out of every probability the model produces.

When TP does not divide the vocabulary ``V``, the model is built with ``V_pad`` rows
(``parallel.layout.padded_vocab_size``); the extra rows of the word embedding and output layer
start at zero (the checkpoint loader zero-fills what the checkpoint does not hold) and their
logits would be 0, a real competitor in every softmax.  A forward hook on the output layer
overwrites the logits of global vocabulary ids ``>= V`` with -inf, before anything reads them:

    rank r holds ids [r·V_pad/TP, (r+1)·V_pad/TP); it keeps the first max(0, V - r·V_pad/TP)
    columns of its shard and sets the rest to -inf.

So Megatron's vocab-parallel cross entropy (the training log-probs) and the gathered logits of
``forward_logits`` give exactly HF's values on the real rows: exp(-inf) = 0 adds nothing to the
partition sum, and the padded columns receive zero gradient (softmax 0, never a label), so the
padded rows of the output layer never move and stay out of the log-probs for good.  Embedding
rows ``>= V`` get no gradient either: no input token id reaches them.
"""

from __future__ import annotations

import torch


def mask_padded_vocab(model, vocab_size: int, padded_vocab_size: int, tp: int, tp_rank: int) -> None:
    """Install the -inf mask on ``model.output_layer`` when this rank holds padded rows."""
    if padded_vocab_size == vocab_size or not hasattr(model, "output_layer"):
        return
    per_rank = padded_vocab_size // tp
    local_real = max(0, vocab_size - tp_rank * per_rank)

    def hook(module, args, output):
        logits, bias = output  # logits: [s, b, V_pad/TP] (or [s, b, V_pad] when gathered)
        width = logits.shape[-1]
        # A TP shard keeps its own real columns; a gathered tensor (width V_pad) keeps the first V.
        keep = vocab_size if width == padded_vocab_size else local_real
        if keep >= width:
            return output
        padded = torch.arange(width, device=logits.device) >= keep  # [width]
        return logits.masked_fill(padded, float("-inf")), bias

    model.output_layer.register_forward_hook(hook)
