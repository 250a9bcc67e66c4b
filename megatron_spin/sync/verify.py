"""Check a push end to end: the engines' log-probs of fixed sequences against the trainer's.

A complete, correct push makes every engine compute the same next-token log-probs as the
actor (to float rounding: 1e-4 in fp32).  Any conversion mistake, lost bucket or engine that
kept old tensors shows up as a gap far above that, whatever the transport did or reported.
It costs one forward of a few short sequences on each side, so the trainer can run it after
every push or every few (``verify_every``).

Collective over the trainer ranks (the actor's forward is); engines are queried by rank 0.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.distributed as dist

from megatron_spin.models.forward import forward_logits
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams


def trainer_token_logprobs(modules: list, pctx, sequences: Sequence[Sequence[int]]) -> Optional[list[torch.Tensor]]:
    """log p(x_t | x_<t) for t >= 1 of each sequence, under the actor; on global rank 0 only."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s))  # right padding cannot change earlier logits
    logits = forward_logits(modules, pctx, ids)  # [b, width, V] on the last stage
    mine = None
    if logits is not None and pctx.tp_rank == 0 and pctx.dp_rank == 0:
        logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        mine = [logp[i, : len(s) - 1].float() for i, s in enumerate(sequences)]
    gathered: list = [None] * pctx.world_size
    dist.all_gather_object(gathered, mine)
    if pctx.rank != 0:
        return None
    return next(g for g in gathered if g is not None)


def engine_token_logprobs(client, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The engine's log-probs of the same tokens (prompt scoring, no generation)."""
    req = GenerateRequest(tuple(tuple(s) for s in sequences), SamplingParams(max_new_tokens=0),
                          return_logprob=True, logprob_start_len=0)
    replies = client.generate(req)
    return [torch.tensor(r[0].input_logprobs[1:], dtype=torch.float32) for r in replies]


def logprob_gap(modules: list, pctx, fleet: Optional[RolloutFleet],
                sequences: Sequence[Sequence[int]]) -> dict[str, float]:
    """Max |engine - trainer| token log-prob per serving engine; the same dict on every rank."""
    ours = trainer_token_logprobs(modules, pctx, sequences)
    result: list = [None]
    if pctx.rank == 0:
        gaps = {}
        for slot in fleet.serving:
            theirs = engine_token_logprobs(slot.client, sequences)
            gaps[slot.client.url] = max(float((a - b).abs().max()) for a, b in zip(ours, theirs))
        result[0] = gaps
    dist.broadcast_object_list(result, src=0)
    return result[0]
