"""Check a push end to end: the engines' log-probs of fixed sequences against the trainer's.

A complete, correct push makes every engine compute the same next-token log-probs as the
actor (to float rounding: ~1e-6 in fp32, a few 1e-2 in bf16 across kernels).  Any conversion
mistake, lost bucket or engine that kept old tensors shows up as a gap far above that,
whatever the transport did or reported.  It costs one forward of a few short sequences on
each side, so a run checks every ``rollout.sync.verify_every`` pushes and stops when the
mean gap per token exceeds ``verify_tolerance``.

The trainer side is collective over the trainer ranks (the actor's forward is); the engines
are queried by whoever holds the fleet (the driver).
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import torch

from megatron_spin.models.forward import forward_logits
from megatron_spin.rollout.client import EngineClient
from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams


class ProbeMismatch(RuntimeError):
    """An engine's log-probs are far from the trainer's after a push: the weights differ."""


@dataclasses.dataclass(frozen=True)
class ProbeGap:
    """|engine − trainer| per-token log-prob over the probe, per engine."""

    max_abs: dict[str, float]
    mean_abs: dict[str, float]

    def as_metrics(self) -> dict[str, float]:
        return {"sync/logprob_gap_max": max(self.max_abs.values()), "sync/logprob_gap_mean": max(self.mean_abs.values())}

    def check(self, tolerance: float, version: str) -> None:
        bad = {u: g for u, g in self.mean_abs.items() if g > tolerance}
        if bad:
            raise ProbeMismatch(
                f"after weight push {version}, engine log-probs differ from the trainer's by a mean "
                f"{', '.join(f'{g:.3g} ({u})' for u, g in bad.items())} per probe token, above "
                f"rollout.sync.verify_tolerance={tolerance}: the engines do not hold the trainer's weights "
                "(a conversion or transport fault); stopping before training on their samples")


def trainer_token_logprobs(modules: list, pctx, sequences: Sequence[Sequence[int]]) -> Optional[list[torch.Tensor]]:
    """log p(x_t | x_<t) for t >= 1 of each sequence under the actor: ``[len-1]`` per sequence, on the
    rank that holds the last stage's TP rank 0 of DP replica 0; None on every other rank."""
    width = max(len(s) for s in sequences)
    ids = torch.zeros(len(sequences), width, dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, : len(s)] = torch.tensor(list(s))  # right padding cannot change earlier logits
    logits = forward_logits(modules, pctx, ids)  # [b, width, V] on the last stage
    if logits is None or pctx.tp_rank != 0 or pctx.dp_rank != 0:
        return None
    logp = torch.log_softmax(logits[:, :-1].double(), dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return [logp[i, : len(s) - 1].float() for i, s in enumerate(sequences)]


def engine_token_logprobs(client: EngineClient, sequences: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """The engine's log-probs of the same tokens (prompt scoring, no generation)."""
    req = GenerateRequest(tuple(tuple(s) for s in sequences), SamplingParams(max_new_tokens=0),
                          return_logprob=True, logprob_start_len=0)
    replies = client.generate(req)
    return [torch.tensor(r[0].input_logprobs[1:], dtype=torch.float32) for r in replies]


def probe_gap(ours: Sequence[torch.Tensor], engines: Sequence[EngineClient],
              sequences: Sequence[Sequence[int]]) -> ProbeGap:
    """Max and mean |Δ| per token between the trainer's log-probs ``ours`` and each engine's."""
    max_abs, mean_abs = {}, {}
    for client in engines:
        diffs = torch.cat([(a - b).abs() for a, b in zip(ours, engine_token_logprobs(client, sequences))])
        max_abs[client.url], mean_abs[client.url] = float(diffs.max()), float(diffs.mean())
    return ProbeGap(max_abs, mean_abs)
