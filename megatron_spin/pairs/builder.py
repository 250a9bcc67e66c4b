"""Turn scored policy samples into preference pairs, and pairs into a padded tensor batch.

Online DPO: for each prompt the rollout fleet samples ``n >= 2`` responses from the current
policy and a reward source scores them. :func:`build_pairs` turns each prompt's group into
(chosen, rejected) pairs:

* ``best_vs_worst``: one pair, the highest-reward sample against the lowest-reward one;
* ``all_pairs``: every two samples whose rewards differ by more than ``margin``, the higher
  one chosen.

Ties produce no pair (DESIGN.md): a tie is a comparison whose reward difference is ``<= margin``
(exactly equal when ``margin == 0``), or whose two responses are token-identical. Picking
argmax/argmin on a tied group would train the policy to prefer one of two equally good answers
at random, so ties are skipped and counted instead. Samples cut off by the length limit
(``finished=False``) can have ``unfinished_penalty`` subtracted from their reward first, so a
truncated answer does not win on a partial score.

SPIN (Chen et al. 2024, eq. 4.7): :func:`build_spin_pairs` pairs the dataset's ground-truth
response (chosen) with the policy's own samples (rejected); a sample identical to the ground
truth is a tie and is skipped.

:func:`collate_pairs` pads the pairs into a :class:`PreferenceBatch` (chosen rows first, then
rejected; loss mask on the positions that predict response tokens).

Everything here is deterministic: groups are processed in input order, pairs within a group in
input-index order, and among equal rewards the first occurrence wins.
"""

from __future__ import annotations

import enum
import math
from typing import Mapping, Optional, Sequence, TypeVar

import torch

from megatron_spin.pairs.modes import PairStrategy, SpinSelection, TieRule, Truncation
from megatron_spin.pairs.records import PairStats, PreferenceBatch, PreferencePair, ScoredSample

E = TypeVar("E", bound=enum.Enum)


def _coerce(enum_cls: type[E], value, name: str) -> E:
    try:
        return enum_cls(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"{name} must be one of {choices}, got {value!r}") from None


def _check_group(group: Sequence[ScoredSample], index: int, min_samples: int) -> str:
    """Validate one prompt's group and return its prompt_id."""
    if len(group) == 0:
        raise ValueError(f"prompt group {index} is empty (need >= {min_samples} samples per prompt)")
    first = group[0]
    for sample in group:
        if not isinstance(sample, ScoredSample):
            raise TypeError(f"prompt group {index}: expected ScoredSample, got {type(sample).__name__}")
        # Pairs compare responses to ONE prompt; a mixed group would pair unrelated answers.
        if sample.prompt_id != first.prompt_id:
            raise ValueError(
                f"prompt group {index} mixes prompt_ids {first.prompt_id!r} and {sample.prompt_id!r}"
            )
        if sample.prompt_ids != first.prompt_ids:
            raise ValueError(f"prompt_id {first.prompt_id!r}: samples in one group have different prompt_ids")
    if len(group) < min_samples:
        raise ValueError(
            f"prompt_id {first.prompt_id!r} has {len(group)} sample(s); need >= {min_samples} per prompt"
        )
    return first.prompt_id


def _oldest_version(*versions: Optional[int]) -> Optional[int]:
    # A pair is as stale as its oldest response; None means "unknown" and is ignored.
    known = [v for v in versions if v is not None]
    return min(known) if known else None


def _make_pair(
    chosen: ScoredSample, rejected: ScoredSample, chosen_reward: float, rejected_reward: float
) -> PreferencePair:
    return PreferencePair(
        prompt_id=chosen.prompt_id,
        prompt_ids=chosen.prompt_ids,
        chosen_ids=chosen.response_ids,
        rejected_ids=rejected.response_ids,
        chosen_reward=chosen_reward,
        rejected_reward=rejected_reward,
        weight_version=_oldest_version(chosen.weight_version, rejected.weight_version),
    )


def build_pairs(
    samples_by_prompt: Sequence[Sequence[ScoredSample]],
    *,
    strategy: PairStrategy | str,
    margin: float = 0.0,
    unfinished_penalty: Optional[float] = None,
    ties: TieRule | str = TieRule.SKIP,
) -> tuple[list[PreferencePair], PairStats]:
    """Pair each prompt's scored samples; return the pairs (in input order) and the counts.

    ``samples_by_prompt[i]`` holds the ``n >= 2`` samples of one prompt (fewer: ValueError naming
    the prompt_id). A comparison is a tie, skipped and counted in ``ties_skipped``, when the
    reward difference is ``<= margin`` or the two responses are token-identical. With
    ``best_vs_worst`` there is one comparison per prompt (best vs worst), with ``all_pairs`` one
    per unordered sample pair, so ``pairs + ties_skipped == n * (n - 1) / 2`` per prompt.

    ``unfinished_penalty`` is subtracted from the reward of every ``finished=False`` sample before
    pairing; the pairs carry these effective rewards.

    ``ties="first"`` pairs a tied comparison anyway (counted in ``ties_paired``): the earlier
    sample is chosen, and best-vs-worst of an all-equal group pairs sample 0 with sample 1 — TRL's
    ``OnlineDPOTrainer`` rule (``chosen = first if r_first >= r_second``).
    """
    strategy = _coerce(PairStrategy, strategy, "strategy")
    ties = _coerce(TieRule, ties, "ties")
    margin = float(margin)
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin}")
    if ties is TieRule.FIRST and margin > 0:
        raise ValueError(f"ties='first' pairs exact ties only; with margin {margin} it would choose the "
                         "earlier of two samples whatever their order")
    if unfinished_penalty is not None:
        unfinished_penalty = float(unfinished_penalty)
        if not math.isfinite(unfinished_penalty) or unfinished_penalty < 0:
            raise ValueError(
                f"unfinished_penalty must be a finite number >= 0 or None, got {unfinished_penalty}"
            )

    pairs: list[PreferencePair] = []
    samples = tie_count = without_pair = penalised = paired_ties = 0
    for index, group in enumerate(samples_by_prompt):
        _check_group(group, index, min_samples=2)
        samples += len(group)
        rewards = []
        for sample in group:
            reward = sample.reward
            if unfinished_penalty is not None and not sample.finished:
                reward -= unfinished_penalty
                penalised += 1
            rewards.append(reward)

        # (chosen index, rejected index) comparisons for this group, in a fixed order.
        if strategy is PairStrategy.BEST_VS_WORST:
            # max()/min() return the first of equal keys: first occurrence breaks ties.
            best = max(range(len(group)), key=rewards.__getitem__)
            worst = min(range(len(group)), key=rewards.__getitem__)
            if worst == best:  # every reward equal: the first sample against the next one
                worst = 1 if best == 0 else 0
            comparisons = [(best, worst)]
        else:
            # Input-index order i < j, oriented so the higher reward is chosen.
            comparisons = [
                (i, j) if rewards[i] >= rewards[j] else (j, i)
                for i in range(len(group))
                for j in range(i + 1, len(group))
            ]

        kept = 0
        for c, r in comparisons:
            # margin == 0 makes this "exactly equal" since rewards[c] >= rewards[r] here.
            if rewards[c] - rewards[r] <= margin or group[c].response_ids == group[r].response_ids:
                if ties is TieRule.SKIP:
                    tie_count += 1
                    continue
                c, r = min(c, r), max(c, r)  # the earlier sample is chosen
                paired_ties += 1
            pairs.append(_make_pair(group[c], group[r], rewards[c], rewards[r]))
            kept += 1
        if kept == 0:
            without_pair += 1

    stats = PairStats(
        prompts=len(samples_by_prompt),
        samples=samples,
        pairs=len(pairs),
        ties_skipped=tie_count,
        prompts_without_pair=without_pair,
        unfinished_penalised=penalised,
        ties_paired=paired_ties,
    )
    return pairs, stats


def build_spin_pairs(
    samples_by_prompt: Sequence[Sequence[ScoredSample]],
    ground_truth: Mapping[str, Sequence[int]],
    *,
    per_prompt: SpinSelection | str = SpinSelection.ALL,
) -> tuple[list[PreferencePair], PairStats]:
    """SPIN pairs: chosen = ground-truth response of the prompt, rejected = a policy sample.

    ``ground_truth`` maps prompt_id to the dataset's response token ids (missing: KeyError naming
    the prompt_id; empty: ValueError). Each group needs >= 1 sample. A sample whose response
    equals the ground truth exactly is skipped and counted in ``ties_skipped`` (chosen and
    rejected would be the same sequence: a zero-gradient pair). ``per_prompt='all'`` makes one
    pair per remaining sample, ``'first'`` only from the first one. Rewards are not used: the
    pairs carry ``None`` rewards.
    """
    per_prompt = _coerce(SpinSelection, per_prompt, "per_prompt")
    pairs: list[PreferencePair] = []
    samples = ties = without_pair = 0
    for index, group in enumerate(samples_by_prompt):
        prompt_id = _check_group(group, index, min_samples=1)
        samples += len(group)
        if prompt_id not in ground_truth:
            raise KeyError(f"no ground-truth response for prompt_id {prompt_id!r}")
        truth = tuple(int(t) for t in ground_truth[prompt_id])
        if not truth:
            raise ValueError(f"prompt_id {prompt_id!r}: ground-truth response is empty")

        kept = 0
        for sample in group:
            if sample.response_ids == truth:
                ties += 1
                continue
            if per_prompt is SpinSelection.FIRST and kept:
                continue  # not a tie: just not selected
            pairs.append(
                PreferencePair(
                    prompt_id=prompt_id,
                    prompt_ids=sample.prompt_ids,
                    chosen_ids=truth,
                    rejected_ids=sample.response_ids,
                    chosen_reward=None,
                    rejected_reward=None,
                    weight_version=sample.weight_version,
                )
            )
            kept += 1
        if kept == 0:
            without_pair += 1

    stats = PairStats(
        prompts=len(samples_by_prompt),
        samples=samples,
        pairs=len(pairs),
        ties_skipped=ties,
        prompts_without_pair=without_pair,
        unfinished_penalised=0,
    )
    return pairs, stats


def collate_pairs(
    pairs: Sequence[PreferencePair],
    *,
    pad_id: int,
    max_length: Optional[int] = None,
    truncate: Truncation | str = Truncation.ERROR,
    pad_to_multiple_of: int = 1,
) -> PreferenceBatch:
    """Pad ``pairs`` into a :class:`PreferenceBatch`: P chosen rows, then P rejected rows.

    Each row is ``prompt_ids + response`` right-padded with ``pad_id`` to
    ``S = longest row`` rounded up to ``pad_to_multiple_of`` (e.g. the TP size for sequence
    parallelism). Rows longer than ``max_length``: ``truncate='error'`` raises ValueError naming
    the prompt_id and lengths; ``'right'`` drops the end of the response, and raises if the
    prompt alone has ``>= max_length`` tokens (no response token would remain). Empty prompts
    (nothing would predict the first response token) and empty responses raise ValueError.
    """
    truncate = _coerce(Truncation, truncate, "truncate")
    pad_id = int(pad_id)
    if pad_id < 0:
        raise ValueError(f"pad_id must be a non-negative token id, got {pad_id}")
    if max_length is not None and int(max_length) < 2:
        raise ValueError(f"max_length must be >= 2 (one prompt and one response token), got {max_length}")
    if int(pad_to_multiple_of) < 1:
        raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
    if len(pairs) == 0:
        raise ValueError("no pairs to collate (every prompt tied?); skip the step instead")

    # (prompt, response) per row: chosen responses of every pair first, then rejected ones.
    rows: list[tuple[tuple[int, ...], tuple[int, ...]]] = []
    for side in ("chosen_ids", "rejected_ids"):
        for pair in pairs:
            prompt, response = pair.prompt_ids, getattr(pair, side)
            what = side.removesuffix("_ids")
            if not prompt:
                raise ValueError(f"prompt_id {pair.prompt_id!r}: empty prompt")
            if not response:
                raise ValueError(f"prompt_id {pair.prompt_id!r}: empty {what} response")
            total = len(prompt) + len(response)
            if max_length is not None and total > max_length:
                if truncate is Truncation.ERROR:
                    raise ValueError(
                        f"prompt_id {pair.prompt_id!r}: {what} sequence has {total} tokens "
                        f"(prompt {len(prompt)} + response {len(response)}) > max_length {max_length}"
                    )
                if len(prompt) >= max_length:
                    raise ValueError(
                        f"prompt_id {pair.prompt_id!r}: prompt has {len(prompt)} tokens >= max_length "
                        f"{max_length}; right truncation cuts only responses, none would remain"
                    )
                response = response[: max_length - len(prompt)]
            rows.append((prompt, response))

    multiple = int(pad_to_multiple_of)
    longest = max(len(p) + len(r) for p, r in rows)
    seq_length = -(-longest // multiple) * multiple

    tokens = torch.full((len(rows), seq_length), pad_id, dtype=torch.long)  # [2P, S]
    loss_mask = torch.zeros((len(rows), seq_length), dtype=torch.float32)  # [2P, S]
    for i, (prompt, response) in enumerate(rows):
        end = len(prompt) + len(response)
        tokens[i, :end] = torch.tensor(prompt + response, dtype=torch.long)
        # Response tokens sit at [len(prompt), end); the logits predicting them sit one earlier.
        loss_mask[i, len(prompt) - 1 : end - 1] = 1.0
    response_lengths = torch.tensor([len(r) for _, r in rows], dtype=torch.long)  # [2P]

    def reward(value: Optional[float]) -> float:
        return math.nan if value is None else value

    return PreferenceBatch(
        tokens=tokens,
        loss_mask=loss_mask,
        response_lengths=response_lengths,
        num_pairs=len(pairs),
        chosen_rewards=tuple(reward(p.chosen_reward) for p in pairs),
        rejected_rewards=tuple(reward(p.rejected_reward) for p in pairs),
        pad_id=pad_id,
        pair_prompt_ids=tuple(p.prompt_id for p in pairs),
    )
