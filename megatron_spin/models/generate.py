"""Greedy decoding on the Megatron model (any TP/PP): a correctness check, not a rollout engine.

Each step recomputes the whole sequence (no KV cache) and takes the argmax on the last
pipeline stage, then broadcasts the token along the pipeline group so every stage extends
the same sequence.  Rollouts at scale come from the SGLang fleet (``rollout/``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from megatron_spin.models.forward import forward_logits


def greedy_generate(
    chunks: list, pctx, prompt_ids: list[int], max_new_tokens: int, eos_token_id: Optional[int] = None
) -> list[int]:
    """Token ids generated after ``prompt_ids`` (stops at EOS, which is included)."""
    ids = list(prompt_ids)
    device = next(chunks[0].parameters()).device  # NCCL broadcasts device tensors
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = forward_logits(chunks, pctx, torch.tensor([ids]))
        token = torch.zeros(1, dtype=torch.long, device=device)
        if logits is not None:
            token[0] = int(logits[0, -1].argmax())
        if pctx.layout.pp > 1:
            dist.broadcast(token, src=pctx.pp_last_rank, group=pctx.pp_group)
        ids.append(int(token))
        new.append(int(token))
        if eos_token_id is not None and new[-1] == eos_token_id:
            break
    return new
