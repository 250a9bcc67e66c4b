"""Typed records that flow from rollout/reward through pair building into the trainer.

One record per stage (DESIGN.md convention 5): a :class:`ScoredSample` is one policy response
with its reward; a :class:`PreferencePair` is one (chosen, rejected) pair for one prompt; a
:class:`PairStats` counts what the pair builder kept and skipped; a :class:`PreferenceBatch` is
the padded tensor batch the DPO/SPIN trainer consumes.

Token ids are stored as tuples of ints so records are hashable, immutable and cheap to compare;
the records coerce lists (or other int sequences) given to them and reject values that would
silently corrupt training later (NaN rewards, negative token ids, mismatched shapes).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Optional, Sequence

import torch

TokenIds = tuple[int, ...]


def _as_token_ids(values: Iterable[int], what: str, prompt_id: str) -> TokenIds:
    """Coerce an int sequence to a tuple of Python ints; negative ids cannot index an embedding."""
    ids = tuple(int(v) for v in values)
    if any(v < 0 for v in ids):
        raise ValueError(f"prompt_id {prompt_id!r}: {what} contains a negative token id")
    return ids


def _as_reward(value, what: str, prompt_id: str) -> float:
    # NaN compares false with everything, so one NaN reward would quietly decide the pairing;
    # +/-inf differences give NaN margins. Reject both where they enter.
    reward = float(value)
    if not math.isfinite(reward):
        raise ValueError(f"prompt_id {prompt_id!r}: {what} must be finite, got {reward}")
    return reward


@dataclasses.dataclass(frozen=True)
class ScoredSample:
    """One policy response to one prompt, scored by a reward source.

    ``response_ids`` are exactly the tokens the trainer will score (include the EOS token if the
    engine emitted one, so the policy is trained to stop). ``finished`` is True iff the response
    ended with EOS rather than hitting the length limit.
    """

    prompt_id: str
    prompt_ids: TokenIds
    response_ids: TokenIds
    reward: float
    finished: bool  # emitted EOS (False: cut off by the generation length limit)
    weight_version: Optional[int] = None  # policy version that generated it (rollout engine)
    response_text: Optional[str] = None

    def __post_init__(self) -> None:
        # frozen: coercion has to go through object.__setattr__.
        object.__setattr__(self, "prompt_id", str(self.prompt_id))
        object.__setattr__(self, "prompt_ids", _as_token_ids(self.prompt_ids, "prompt_ids", self.prompt_id))
        object.__setattr__(
            self, "response_ids", _as_token_ids(self.response_ids, "response_ids", self.prompt_id)
        )
        object.__setattr__(self, "reward", _as_reward(self.reward, "reward", self.prompt_id))
        object.__setattr__(self, "finished", bool(self.finished))


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One (chosen, rejected) pair of responses to the same prompt.

    Rewards are the *effective* rewards that decided the pair (after any unfinished-sample
    penalty), so ``chosen_reward > rejected_reward`` holds whenever both are set. They are
    ``None`` in SPIN pairs: the chosen side is the dataset's ground truth, which has no reward,
    and SPIN does not rank policy samples by reward either.
    """

    prompt_id: str
    prompt_ids: TokenIds
    chosen_ids: TokenIds
    rejected_ids: TokenIds
    chosen_reward: Optional[float]  # None for SPIN ground truth
    rejected_reward: Optional[float]
    weight_version: Optional[int]  # oldest policy version among the sampled responses

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_id", str(self.prompt_id))
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            object.__setattr__(self, name, _as_token_ids(getattr(self, name), name, self.prompt_id))
        for name in ("chosen_reward", "rejected_reward"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _as_reward(value, name, self.prompt_id))


@dataclasses.dataclass(frozen=True)
class PairStats:
    """What the pair builder saw, kept and skipped for one batch of prompts.

    A *tie* is a comparison that produced no pair because the two rewards were equal (or within
    the margin), or because the two responses were token-identical (in SPIN: a policy sample equal
    to the ground truth). Stats from several batches or ranks add up with ``+`` or ``sum()``.
    """

    prompts: int = 0
    samples: int = 0
    pairs: int = 0
    ties_skipped: int = 0
    prompts_without_pair: int = 0
    unfinished_penalised: int = 0
    ties_paired: int = 0  # ties paired anyway (tie rule "first")

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"PairStats.{field.name} must be a non-negative int, got {value!r}")

    def __add__(self, other: "PairStats") -> "PairStats":
        if not isinstance(other, PairStats):
            return NotImplemented
        return PairStats(
            **{f.name: getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)}
        )

    def __radd__(self, other) -> "PairStats":
        # Lets sum(stats_list) start from its default 0.
        if other == 0:
            return self
        return NotImplemented

    def merge(self, *others: "PairStats") -> "PairStats":
        """The sum of this and ``others`` (e.g. the stats of every data-parallel rank)."""
        total = self
        for other in others:
            total = total + other
        return total

    def as_metrics(self, prefix: str = "pairs/") -> dict[str, float]:
        """Flat metrics for a logger; the key set is fixed so dashboards do not break."""
        return {
            f"{prefix}prompts": float(self.prompts),
            f"{prefix}samples": float(self.samples),
            f"{prefix}kept": float(self.pairs),
            f"{prefix}ties_skipped": float(self.ties_skipped),
            f"{prefix}ties_paired": float(self.ties_paired),
            f"{prefix}prompts_without_pair": float(self.prompts_without_pair),
            f"{prefix}unfinished_penalised": float(self.unfinished_penalised),
            # Rates are 0.0 for an empty batch rather than NaN, so they can be averaged.
            f"{prefix}kept_per_prompt": self.pairs / self.prompts if self.prompts else 0.0,
            f"{prefix}prompts_without_pair_frac": (
                self.prompts_without_pair / self.prompts if self.prompts else 0.0
            ),
        }


@dataclasses.dataclass(frozen=True, eq=False)
class PreferenceBatch:
    """The padded tensor batch of P preference pairs that one DPO/SPIN step consumes.

    Layout: rows ``0..P-1`` are the chosen sequences of pairs ``0..P-1`` and rows ``P..2P-1``
    their rejected sequences in the same order, so per-row sequence log-probs ``logp [2P]``
    split as ``logp[:P]`` (chosen) and ``logp[P:]`` (rejected). Each row is prompt + response,
    right-padded with ``pad_id``. Right padding needs no attention mask under causal attention:
    padding only follows the real tokens, which therefore never attend to it.

    Shift convention (the same as Megatron's GPT ``labels``/``loss_mask``): the logits at
    position ``t`` predict token ``t + 1``, so ``loss_mask[:, t] == 1`` iff ``tokens[:, t + 1]``
    is a response token. The last column is therefore always 0. Use it as either

    * ``labels`` (``tokens`` shifted left by one, last column ``pad_id``) with ``loss_mask``,
      both ``[2P, S]`` and aligned with the logits of the full ``tokens``; or
    * ``logits[:, :-1]`` against ``tokens[:, 1:]`` with ``loss_mask[:, :-1]``.

    ``loss_mask[i].sum() == response_lengths[i] >= 1`` for every row (collation rejects empty
    responses), so no row's loss is ever all-masked.

    ``pair_weights`` ([P]: 1 for a real pair, 0 for a padding pair) and ``loss_scale`` let a batch
    be padded to whole micro-batches without dropping a pair (:meth:`padded_to`): a padding pair
    carries no loss, and the scale makes the gradient that of the mean over the real pairs.
    """

    tokens: torch.Tensor  # [2P, S] int64: chosen rows first, then rejected
    loss_mask: torch.Tensor  # [2P, S] float32: 1 where the NEXT token is a response token
    response_lengths: torch.Tensor  # [2P] int64: response tokens per row (after truncation)
    num_pairs: int  # P
    chosen_rewards: tuple[float, ...]  # [P], nan where there is none (SPIN ground truth)
    rejected_rewards: tuple[float, ...]  # [P], nan where there is none
    pad_id: int
    pair_prompt_ids: tuple[str, ...]  # [P] prompt_id of each pair, for logs and error messages
    pair_weights: Optional[torch.Tensor] = None  # [P] float32: 1 real pair, 0 padding (None: all real)
    loss_scale: float = 1.0  # padded pairs / real pairs of the whole batch (see padded_to)

    def __post_init__(self) -> None:
        # Shape and dtype checks only: anything data-dependent would force a device sync.
        p = self.num_pairs
        if self.pair_weights is None:
            object.__setattr__(self, "pair_weights", torch.ones(p, dtype=torch.float32))
        if tuple(self.pair_weights.shape) != (p,):
            raise ValueError(f"pair_weights must be [P]=[{p}], got {tuple(self.pair_weights.shape)}")
        if p < 1:
            raise ValueError(f"PreferenceBatch needs at least one pair, got num_pairs={p}")
        if self.tokens.dim() != 2 or self.tokens.shape[0] != 2 * p:
            raise ValueError(f"tokens must be [2P, S] with P={p}, got {tuple(self.tokens.shape)}")
        if self.tokens.dtype != torch.long:
            raise ValueError(f"tokens must be int64, got {self.tokens.dtype}")
        if self.loss_mask.shape != self.tokens.shape:
            raise ValueError(
                f"loss_mask shape {tuple(self.loss_mask.shape)} != tokens shape {tuple(self.tokens.shape)}"
            )
        if not self.loss_mask.is_floating_point():
            raise ValueError(f"loss_mask must be floating point, got {self.loss_mask.dtype}")
        if tuple(self.response_lengths.shape) != (2 * p,) or self.response_lengths.dtype != torch.long:
            raise ValueError(
                f"response_lengths must be int64 [2P]=[{2 * p}], got "
                f"{self.response_lengths.dtype} {tuple(self.response_lengths.shape)}"
            )
        for name in ("chosen_rewards", "rejected_rewards", "pair_prompt_ids"):
            if len(getattr(self, name)) != p:
                raise ValueError(f"{name} must have P={p} entries, got {len(getattr(self, name))}")

    @property
    def seq_length(self) -> int:
        return self.tokens.shape[1]

    @property
    def labels(self) -> torch.Tensor:
        """``tokens`` shifted left by one ([2P, S]); the last column is ``pad_id`` (masked out)."""
        pad = self.tokens.new_full((self.tokens.shape[0], 1), self.pad_id)
        return torch.cat([self.tokens[:, 1:], pad], dim=1)

    def padding_mask(self) -> torch.Tensor:
        """``[2P, S]`` bool, True at the positions after each row's last response token: what a MoE
        router's load-balancing loss must not count (Megatron's ``padding_mask``).  A padding pair's
        rows (a copy of pair 0) keep their tokens: every row has at least one real token, so no
        micro-batch is ever all padding (the loss would divide by zero tokens)."""
        positions = torch.arange(self.tokens.shape[1], device=self.loss_mask.device)
        # loss_mask[t] = 1 iff token t+1 is a response token: the last real token is at (last t)+1.
        last = torch.where(self.loss_mask.bool(), positions, -1).amax(dim=1)  # [2P]
        return positions.unsqueeze(0) > (last + 1).unsqueeze(1)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "PreferenceBatch":
        """A copy with every tensor on ``device`` (rewards and ids stay Python values)."""
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device, non_blocking=non_blocking),
            loss_mask=self.loss_mask.to(device, non_blocking=non_blocking),
            response_lengths=self.response_lengths.to(device, non_blocking=non_blocking),
            pair_weights=self.pair_weights.to(device, non_blocking=non_blocking),
        )

    def padded_to(self, multiple: int) -> "PreferenceBatch":
        """This batch with padding pairs (copies of pair 0 of weight 0) up to a multiple of
        ``multiple`` pairs — whole micro-batches on every data-parallel rank — and
        ``loss_scale = padded / real``: each micro-batch's mean over its pairs, times the scale,
        makes the gradient exactly that of the mean over the real pairs (Megatron divides by the
        micro-batch count, DDP by the ranks)."""
        extra = -self.num_pairs % int(multiple)
        if not extra:
            return self
        rows = [0] * extra
        pad = self.select_pairs(rows)
        p, q = self.num_pairs, self.num_pairs + extra

        def both(a, b):  # chosen rows of both, then rejected rows of both
            return torch.cat([a[:p], b[:extra], a[p:], b[extra:]])

        return PreferenceBatch(
            tokens=both(self.tokens, pad.tokens), loss_mask=both(self.loss_mask, pad.loss_mask),
            response_lengths=both(self.response_lengths, pad.response_lengths), num_pairs=q,
            chosen_rewards=self.chosen_rewards + pad.chosen_rewards,
            rejected_rewards=self.rejected_rewards + pad.rejected_rewards, pad_id=self.pad_id,
            pair_prompt_ids=self.pair_prompt_ids + tuple("<padding>" for _ in rows),
            pair_weights=torch.cat([self.pair_weights, torch.zeros(extra, dtype=self.pair_weights.dtype)]),
            loss_scale=q / float(self.pair_weights.sum()),
        )

    def select_pairs(self, indices: Sequence[int]) -> "PreferenceBatch":
        """The sub-batch of the given pairs, again chosen-first; the sequence length is kept."""
        idx = [int(i) for i in indices]
        if not idx or any(i < 0 or i >= self.num_pairs for i in idx):
            raise ValueError(f"pair indices must be a non-empty subset of 0..{self.num_pairs - 1}, got {idx}")
        # Row i is pair i's chosen sequence, row P + i its rejected one.
        rows = torch.tensor(idx + [self.num_pairs + i for i in idx], device=self.tokens.device)
        return PreferenceBatch(
            tokens=self.tokens.index_select(0, rows),
            loss_mask=self.loss_mask.index_select(0, rows),
            response_lengths=self.response_lengths.index_select(0, rows.to(self.response_lengths.device)),
            num_pairs=len(idx),
            chosen_rewards=tuple(self.chosen_rewards[i] for i in idx),
            rejected_rewards=tuple(self.rejected_rewards[i] for i in idx),
            pad_id=self.pad_id,
            pair_prompt_ids=tuple(self.pair_prompt_ids[i] for i in idx),
            pair_weights=self.pair_weights.index_select(0, torch.tensor(idx, device=self.pair_weights.device)),
            loss_scale=self.loss_scale,
        )

    def split_micro_batches(
        self, pairs_per_micro_batch: int, *, allow_partial: bool = False
    ) -> list["PreferenceBatch"]:
        """Split into micro-batches of ``k`` consecutive pairs, each again chosen-first.

        A pair's chosen and rejected rows always land in the same micro-batch, because the DPO
        loss needs both log-probs at once. Every micro-batch keeps this batch's sequence length:
        pipeline-parallel schedules send activations of one fixed shape through every micro-batch
        of a step. ``P % k != 0`` is an error unless ``allow_partial`` (the last one is smaller).
        """
        k = int(pairs_per_micro_batch)
        if k < 1:
            raise ValueError(f"pairs_per_micro_batch must be >= 1, got {pairs_per_micro_batch}")
        if self.num_pairs % k and not allow_partial:
            raise ValueError(
                f"rule num_pairs % pairs_per_micro_batch == 0 violated: {self.num_pairs} pairs, "
                f"{k} per micro-batch (pass allow_partial=True for a smaller last micro-batch)"
            )
        return [
            self.select_pairs(range(start, min(start + k, self.num_pairs)))
            for start in range(0, self.num_pairs, k)
        ]
