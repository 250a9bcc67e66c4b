"""Batched sampling over an HF ``transformers`` causal LM: the generation core of the embedded engine.

Algorithm of ``HFGenerator.run(jobs)``:

1. Plan sub-batches in job order, closing one when the sum of ``len(prompt) + max_new_tokens``
   over its jobs would exceed ``max_batch_tokens`` (a job larger than the budget runs alone).
2. Per sub-batch, left-pad the prompts to a common length ``L``.  Positions are counted from
   each row's first real token (``cumsum(mask) - 1``) and the 2-D attention mask hides the
   pads, so every row's logits equal those of an unpadded forward of that row alone.
3. Prefill once with a fresh ``DynamicCache``.  Only the trailing logit columns that some
   row needs are materialised (``logits_to_keep``): the last column always, and, for jobs
   asking for prompt log-probs, the columns from their ``logprob_start_len`` on.
4. Decode one token per step for all rows, feeding back the chosen tokens with the KV cache.
   Per row, each step:
     - ``logprob = log_softmax(raw logits)[token]`` in fp32, at temperature 1 and before any
       masking: the quantity the trainer recomputes with a full-sequence forward;
     - stop tokens (eos unless ``ignore_eos``, plus ``stop_token_ids``) get ``-inf`` while fewer
       than ``min_new_tokens`` tokens exist;
     - ``temperature == 0``: argmax.  Otherwise logits / temperature, keep the ``top_k`` best,
       then the smallest prefix of those whose renormalised mass reaches ``top_p`` (the best
       token is always kept), and sample by inversion: the first token whose cumulative
       probability (float64) exceeds ``u * total`` with ``u ~ U[0, 1)`` — exact sampling from
       ``p`` with one uniform per row and step (a zero-probability token is never chosen: the
       cumulative sum does not rise there);
     - a stop token ends the row with ``"stop"`` (the token is kept, as in SGLang); so does a
       stop string (``params.stop``) found in the decoded tail of the row's output — the last
       ``max(len(stop)) + 1`` tokens, as SGLang looks (a token decodes to at least one
       character), once it has more than ``min_new_tokens`` tokens — so a row stops at the
       token that completes the string; reaching ``max_new_tokens`` ends it with ``"length"``;
     - with ``top_logprobs_num = k`` the ``k`` best tokens of the same fp32 log-softmax are
       kept too (so the chosen token's log-prob equals the best one's exactly when greedy);
     - ``on_token(job, token)`` hears every token as it is chosen (streaming replies).
   Finished rows are fed a pad token and their outputs are frozen; the loop ends when every
   row is done.
   A row whose caller has gone (``abandoned(job)``, asked before the prefill and before every
   decode step) ends with ``"abort"`` there; a sub-batch whose jobs are all abandoned is not
   started, so a request its client gave up on stops costing compute within one step.
5. Randomness: a job with ``params.seed`` draws its uniforms from its own ``torch.Generator``
   seeded with it, one per sampled step, so the same
   seed, prompt and weights give the same output whatever else is in the batch.  Jobs without
   a seed share the generator owned by the ``HFGenerator``.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import torch

from megatron_spin.rollout.protocol import SamplingParams, TopLogprobs

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"  # SGLang's reason for a request aborted before it finished


def _never(job: int) -> bool:
    return False


def _ignore(job: int, token: int) -> None:
    pass


@dataclasses.dataclass(frozen=True)
class GenerationJob:
    """One sample to draw.  ``params.n`` is ignored: the server expands ``n`` into ``n`` jobs."""

    input_ids: tuple[int, ...]
    params: SamplingParams
    return_logprob: bool = False
    logprob_start_len: int = -1  # >= 0 (with return_logprob): also score the prompt from here
    top_logprobs_num: int = 0  # (with return_logprob) the k best tokens at every scored position

    def __post_init__(self):
        if not self.input_ids:
            raise ValueError("GenerationJob.input_ids must hold at least one token")

    @property
    def wants_input_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


@dataclasses.dataclass(frozen=True)
class GenerationOutput:
    """``input_logprobs`` covers prompt positions ``logprob_start_len .. len(prompt) - 1``;
    entry ``p`` is ``log p(prompt[p] | prompt[:p])`` and position 0 (no context) is ``None``.
    The ``*_top_logprobs`` (with ``top_logprobs_num``) line up with them: per position the
    ``(token_id, logprob)`` pairs of the best tokens, best first."""

    output_ids: tuple[int, ...]
    finish_reason: str  # "stop" | "length" | "abort"
    output_logprobs: Optional[tuple[float, ...]]
    input_logprobs: Optional[tuple[Optional[float], ...]]
    output_top_logprobs: Optional[tuple[TopLogprobs, ...]] = None
    input_top_logprobs: Optional[tuple[Optional[TopLogprobs], ...]] = None


class HFGenerator:
    """Runs ``GenerationJob`` s on one HF causal LM (eval mode); see the module docstring."""

    def __init__(self, model, eos_token_ids: Sequence[int], max_batch_tokens: int = 16384,
                 detokenize: Optional[Callable[[Sequence[int]], str]] = None):
        """``detokenize(ids) -> text`` (the tokenizer's decode, special tokens skipped) is needed
        only by jobs with stop strings."""
        if max_batch_tokens < 1:
            raise ValueError(f"max_batch_tokens must be >= 1, got {max_batch_tokens}")
        self.model = model
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.max_batch_tokens = max_batch_tokens
        self.detokenize = detokenize
        self.device = next(model.parameters()).device
        # Pads are always masked out, so any valid id does; eos is one the model knows.
        self.pad_id = self.eos_token_ids[0] if self.eos_token_ids else 0
        self.generator = torch.Generator(device=self.device)
        self.generator.seed()  # unseeded jobs are meant to differ from run to run

    @torch.inference_mode()
    def run(self, jobs: Sequence[GenerationJob], abandoned: Callable[[int], bool] = _never,
            on_token: Callable[[int, int], None] = _ignore) -> list[GenerationOutput]:
        """Outputs in job order; ``abandoned(i)``: job ``i``'s caller has gone (stop its row);
        ``on_token(i, token)``: job ``i`` chose ``token`` (called on this thread, keep it short)."""
        if any(j.params.stop for j in jobs) and self.detokenize is None:
            raise ValueError("stop strings need a detokenize function (the model's tokenizer)")
        outputs: list[Optional[GenerationOutput]] = [None] * len(jobs)
        for batch in _plan_batches(jobs, self.max_batch_tokens):
            outs = self._run_batch([jobs[i] for i in batch], lambda r, batch=batch: abandoned(batch[r]),
                                   lambda r, tok, batch=batch: on_token(batch[r], tok))
            for i, out in zip(batch, outs):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    # ------------------------------------------------------------------------------ one batch

    def _run_batch(self, jobs: list[GenerationJob], abandoned: Callable[[int], bool] = _never,
                   on_token: Callable[[int, int], None] = _ignore) -> list[GenerationOutput]:
        dev, B = self.device, len(jobs)
        lens = [len(j.input_ids) for j in jobs]
        L = max(lens)
        pads = [L - n for n in lens]
        ids = torch.full((B, L), self.pad_id, dtype=torch.long, device=dev)  # (B, L)
        mask = torch.zeros((B, L), dtype=torch.long, device=dev)  # (B, L)
        for r, job in enumerate(jobs):
            ids[r, pads[r]:] = torch.tensor(job.input_ids, dtype=torch.long, device=dev)
            mask[r, pads[r]:] = 1
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # (B, L); pads' positions are masked anyway

        # Column c of the prefill logits predicts padded column c + 1; prompt position p >= 1
        # of row r is predicted by column pads[r] + p - 1.
        first_col = L - 1
        for r, job in enumerate(jobs):
            if job.wants_input_logprobs:
                first_col = min(first_col, pads[r] + max(min(job.logprob_start_len, lens[r]), 1) - 1)
        keep = L - first_col

        max_new = [j.params.max_new_tokens for j in jobs]
        out_ids: list[list[int]] = [[] for _ in jobs]
        out_lps: list[list[float]] = [[] for _ in jobs]
        out_tops: list[list[TopLogprobs]] = [[] for _ in jobs]
        finish: list[Optional[str]] = [None if m > 0 else FINISH_LENGTH for m in max_new]
        in_lps: list[Optional[tuple]] = [None] * B
        in_tops: list[Optional[tuple]] = [None] * B
        assemble = lambda finish: _assemble(jobs, out_ids, out_lps, out_tops, finish, in_lps, in_tops)  # noqa: E731
        if all(abandoned(r) for r in range(B)):  # nobody waits for this sub-batch: do not start it
            return assemble([FINISH_ABORT] * B)
        if all(f is not None for f in finish) and not any(j.wants_input_logprobs for j in jobs):
            return assemble(finish)

        cache = _new_cache(self.model)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                            use_cache=True, logits_to_keep=keep).logits  # (B, keep, V)
        for r, job in enumerate(jobs):
            if job.wants_input_logprobs:
                in_lps[r], in_tops[r] = _prompt_logprobs(logits[r], job, pads[r], L - keep)
        logits = logits[:, -1, :].float()  # (B, V): predicts each row's first new token
        top_k = max((j.top_logprobs_num for j in jobs if j.return_logprob), default=0)
        stops = [_StopStrings(j.params.stop, self.detokenize) if j.params.stop else None for j in jobs]

        sampler = _RowSampler(jobs, self.eos_token_ids, logits.shape[-1], dev, self.generator)
        prompt_lens = torch.tensor(lens, device=dev)  # (B,)
        for step in range(max(max_new)):
            if _abort_abandoned(finish, abandoned):
                break
            active = [r for r in range(B) if finish[r] is None]
            tokens = sampler.choose(logits, active, step)  # (B,)
            logp = torch.log_softmax(logits, dim=-1)  # (B, V)
            logprobs = logp.gather(1, tokens[:, None])[:, 0]  # (B,)
            tops = _top_pairs(logp, top_k) if top_k else None  # B lists of (token, logprob)
            is_stop = sampler.stop_mask.gather(1, tokens[:, None])[:, 0]  # (B,)
            for r, tok, lp, stop in zip(range(B), tokens.tolist(), logprobs.tolist(), is_stop.tolist()):
                if finish[r] is not None:
                    continue
                out_ids[r].append(tok)
                out_lps[r].append(lp)
                if tops is not None:
                    out_tops[r].append(tops[r][:jobs[r].top_logprobs_num])
                on_token(r, tok)
                # A stop token landing exactly on the limit still reports "stop": the text is complete.
                if stop or (stops[r] is not None and len(out_ids[r]) > sampler.min_new[r] and stops[r].found(out_ids[r])):
                    finish[r] = FINISH_STOP
                elif len(out_ids[r]) >= max_new[r]:
                    finish[r] = FINISH_LENGTH
            if all(f is not None for f in finish):
                break
            done = torch.tensor([f is not None for f in finish], device=dev)  # (B,)
            tokens = tokens.masked_fill(done, self.pad_id)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=dev)], dim=1)  # (B, L+step+1)
            logits = self.model(input_ids=tokens[:, None], attention_mask=mask,
                                position_ids=(prompt_lens + step)[:, None], past_key_values=cache,
                                use_cache=True).logits[:, -1, :].float()  # (B, V)
        return assemble(finish)


class _StopStrings:
    """Whether a row's output has produced one of its stop strings: the decoded tail of the last
    ``max(len(stop)) + 1`` tokens is searched (SGLang's window: a token decodes to >= 1 character)."""

    def __init__(self, stop: Sequence[str], detokenize: Callable[[Sequence[int]], str]):
        self.stop = tuple(stop)
        self.window = max(map(len, stop)) + 1
        self.detokenize = detokenize

    def found(self, output_ids: Sequence[int]) -> bool:
        tail = self.detokenize(output_ids[-self.window:])
        return any(s in tail for s in self.stop)


def _top_pairs(logp: torch.Tensor, k: int) -> list[list[tuple[int, float]]]:
    """Per row of ``logp`` (R, V) its ``k`` best ``(token, logprob)`` pairs, best first."""
    values, ids = logp.topk(k, dim=-1)  # (R, k) each
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


class _RowSampler:
    """Per-row sampling parameters of one batch as tensors, and the token choice of one step."""

    def __init__(self, jobs: list[GenerationJob], eos: tuple[int, ...], vocab: int, device, shared: torch.Generator):
        B = len(jobs)
        params = [j.params for j in jobs]
        self.temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=device)  # (B,)
        self.top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab else vocab for p in params], device=device)  # (B,)
        self.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)  # (B,)
        self.min_new = [p.min_new_tokens for p in params]
        self.sampled = [p.temperature > 0 for p in params]
        self.filtered = [p.top_k != -1 or p.top_p < 1.0 for p in params]
        self.stop_mask = torch.zeros((B, vocab), dtype=torch.bool, device=device)  # (B, V)
        for r, p in enumerate(params):
            stops = [t for t in p.stop_token_ids + (() if p.ignore_eos else eos) if 0 <= t < vocab]
            self.stop_mask[r, stops] = True
        self.generators = [shared if p.seed is None else torch.Generator(device=device).manual_seed(p.seed)
                           for p in params]

    def choose(self, logits: torch.Tensor, active: list[int], step: int) -> torch.Tensor:
        """Tokens (B,) for raw fp32 logits (B, V); rows not in ``active`` get an arbitrary token."""
        logits = logits.clone()  # (B, V)
        for r in active:
            if step < self.min_new[r]:
                logits[r].masked_fill_(self.stop_mask[r], float("-inf"))
        tokens = logits.argmax(dim=-1)  # (B,): the greedy choice
        rows = [r for r in active if self.sampled[r]]
        if not rows:
            return tokens
        idx = torch.tensor(rows, device=logits.device)  # (R,)
        scaled = logits[idx] / self.temperature[idx, None]  # (R, V)
        if any(self.filtered[r] for r in rows):
            probs = _top_k_top_p(scaled, self.top_k[idx], self.top_p[idx])  # (R, V)
        else:
            probs = torch.softmax(scaled, dim=-1)  # (R, V)
        tokens[idx] = _sample_by_inversion(probs, [self.generators[r] for r in rows])
        return tokens


def _sample_by_inversion(probs: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """One token per row of ``probs`` (R, V; unnormalised is fine), row ``i`` drawing its uniform
    from ``generators[i]``: the first index whose float64 cumulative mass exceeds ``u * total``.
    (The exponential race ``argmax(p / E)`` it replaced drew V exponentials per row and step —
    a millisecond each at a 49k vocabulary, a tenth of the decode time on a 2-core CPU.)"""
    cdf = probs.double().cumsum(dim=-1)  # (R, V)
    u = torch.cat([torch.rand(1, dtype=torch.float64, generator=g, device=probs.device) for g in generators])  # (R,)
    # right=True: index j has cdf[j-1] <= u*total < cdf[j], so p[j] > 0.
    picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]  # (R,)
    return picked.clamp_max_(probs.shape[-1] - 1)


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities (R, V) after keeping each row's ``top_k`` best logits, then the shortest
    best-first prefix of those whose renormalised mass reaches ``top_p`` (at least one token)."""
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # (R, V) each
    rank = torch.arange(scaled.shape[-1], device=scaled.device)  # (V,)
    sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)  # (R, V), best first
    mass_before = probs.cumsum(dim=-1) - probs  # (R, V); 0 for the best token, so it always stays
    probs = probs.masked_fill(mass_before >= top_p[:, None], 0.0)
    return torch.zeros_like(probs).scatter_(1, order, probs)  # back to vocabulary order


def _prompt_logprobs(logits: torch.Tensor, job: GenerationJob, pad: int, first_col: int) -> tuple[tuple, Optional[tuple]]:
    """log p(prompt[p] | prompt[:p]) for p = start .. len-1 from one row's kept prefill logits
    (keep, V) whose column 0 is padded column ``first_col``; position 0 gets ``None``.  Also the
    best ``top_logprobs_num`` pairs per position (None without ``top_logprobs_num``)."""
    n = len(job.input_ids)
    start = min(job.logprob_start_len, n)
    positions = list(range(max(start, 1), n))
    entries: list[Optional[float]] = [None] if start == 0 else []
    tops: list[Optional[TopLogprobs]] = [None] if start == 0 else []
    if positions:
        cols = torch.tensor([pad + p - 1 - first_col for p in positions], device=logits.device)  # (P,)
        targets = torch.tensor([job.input_ids[p] for p in positions], device=logits.device)  # (P,)
        logp = torch.log_softmax(logits[cols].float(), dim=-1)  # (P, V)
        entries.extend(logp.gather(1, targets[:, None])[:, 0].tolist())
        if job.top_logprobs_num:
            tops.extend(tuple(pairs) for pairs in _top_pairs(logp, job.top_logprobs_num))
    return tuple(entries), (tuple(tops) if job.top_logprobs_num else None)


def _abort_abandoned(finish: list[Optional[str]], abandoned: Callable[[int], bool]) -> bool:
    """Mark the unfinished rows whose caller has gone as aborted; True when no row is left."""
    for r, f in enumerate(finish):
        if f is None and abandoned(r):
            finish[r] = FINISH_ABORT
    return all(f is not None for f in finish)


def _new_cache(model):
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def _plan_batches(jobs: Sequence[GenerationJob], max_batch_tokens: int) -> list[list[int]]:
    """Consecutive groups of job indices, each within ``max_batch_tokens`` unless a single job exceeds it."""
    batches: list[list[int]] = []
    current: list[int] = []
    used = 0
    for i, job in enumerate(jobs):
        cost = len(job.input_ids) + job.params.max_new_tokens
        if current and used + cost > max_batch_tokens:
            batches.append(current)
            current, used = [], 0
        current.append(i)
        used += cost
    if current:
        batches.append(current)
    return batches


def _assemble(jobs, out_ids, out_lps, out_tops, finish, in_lps, in_tops) -> list[GenerationOutput]:
    return [
        GenerationOutput(
            output_ids=tuple(out_ids[r]),
            finish_reason=finish[r],
            output_logprobs=tuple(out_lps[r]) if job.return_logprob else None,
            input_logprobs=in_lps[r],
            output_top_logprobs=tuple(map(tuple, out_tops[r])) if job.return_logprob and job.top_logprobs_num else None,
            input_top_logprobs=in_tops[r],
        )
        for r, job in enumerate(jobs)
    ]
