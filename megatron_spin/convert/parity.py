"""Logit and log-prob parity between the HF reference forward and the Megatron model.

The HF model (``transformers``, fp32, eager attention) and the Megatron model loaded from a
dist checkpoint at a given TP × PP (× VPP) layout, launched across TP·PP processes, run the
same token batch; the result is the max absolute logit difference and the max per-token
log-prob difference of next-token log-probs.  A vocabulary padded for TP is compared on its real
rows: ``forward_logits`` returns ``[b, s, V]`` (the padded ids are masked and cut off).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from megatron_spin.ckpt.metadata import read_arch
from megatron_spin.ckpt.model_io import load_model_weights
from megatron_spin.models.builder import build_model
from megatron_spin.models.forward import forward_logits
from megatron_spin.parallel.groups import destroy_parallel, init_parallel
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout, validate_layout


@dataclasses.dataclass(frozen=True)
class ParityResult:
    layout: ParallelLayout
    max_abs_logit_diff: float
    max_logprob_diff: float
    tokens: int

    def ok(self, tol: float) -> bool:
        return self.max_abs_logit_diff <= tol and self.max_logprob_diff <= tol


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(x_{t+1} | x_{<=t}) for t < s-1: ``[b, s-1]`` from logits ``[b, s, V]``."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def sample_batch(vocab_size: int, batch: int = 2, seq_len: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq_len), generator=g)


def hf_logits(hf_dir: str | os.PathLike, input_ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits.float()


def _megatron_rank(rank, world_size, jobs):
    """Forward each (checkpoint, layout) job in turn; layouts smaller than the world run with DP."""
    out = []
    for megatron_dir, layout, input_ids in jobs:
        arch = read_arch(megatron_dir)
        pctx = init_parallel(layout)
        chunks = build_model(arch, pctx, init_weights=False)
        load_model_weights(chunks, megatron_dir)
        logits = forward_logits(chunks, pctx, input_ids)
        # One copy of each result is enough: TP rank 0 of the last stage of DP replica 0.
        out.append(logits if (logits is not None and pctx.tp_rank == 0 and pctx.dp_rank == 0) else None)
        destroy_parallel()
    return out


def megatron_logits_many(
    jobs: list[tuple[str | os.PathLike, ParallelLayout, torch.Tensor]],
    world_size: Optional[int] = None,
    timeout: float = 600,
) -> list[torch.Tensor]:
    """Megatron logits for several (checkpoint, layout, tokens) jobs in one launch.

    ``world_size`` defaults to the largest TP·PP·EP among the jobs (expert parallelism splits data-
    parallel ranks); a smaller layout runs with data parallelism over the remaining ranks (each DP
    replica computes the same batch).
    Sharing one launch amortises process start-up, which dominates for tiny models.
    """

    world_size = world_size or max(layout.model_parallel_size * layout.ep for _, layout, _ in jobs)
    for megatron_dir, layout, _ in jobs:
        validate_layout(read_arch(megatron_dir), layout, world_size=world_size)
    jobs = [(str(d), layout, ids) for d, layout, ids in jobs]
    per_rank = launch(_megatron_rank, world_size, (jobs,), timeout=timeout)
    return [next(r[i] for r in per_rank if r[i] is not None) for i in range(len(jobs))]


def megatron_logits(
    megatron_dir: str | os.PathLike, layout: ParallelLayout, input_ids: torch.Tensor, timeout: float = 600
) -> torch.Tensor:
    (logits,) = megatron_logits_many([(megatron_dir, layout, input_ids)], timeout=timeout)
    return logits


def compare(layout: ParallelLayout, ref: torch.Tensor, got: torch.Tensor, input_ids: torch.Tensor) -> ParityResult:
    return ParityResult(
        layout=layout,
        max_abs_logit_diff=(ref - got).abs().max().item(),
        max_logprob_diff=(token_logprobs(ref, input_ids) - token_logprobs(got, input_ids)).abs().max().item(),
        tokens=input_ids.numel(),
    )


def check_parity(
    hf_dir: str | os.PathLike,
    megatron_dir: str | os.PathLike,
    layout: ParallelLayout,
    input_ids: Optional[torch.Tensor] = None,
    timeout: float = 600,
) -> ParityResult:

    if input_ids is None:
        input_ids = sample_batch(read_arch(megatron_dir).vocab_size)
    ref = hf_logits(hf_dir, input_ids)
    got = megatron_logits(megatron_dir, layout, input_ids, timeout=timeout)
    return compare(layout, ref, got, input_ids)
