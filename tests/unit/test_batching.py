"""megatron_spin.train.batching.rank_micro_batches: the data-parallel split of a global batch.

Pair i has recognisable token ids (prompt 1000+10i.., chosen 2000+10i.., rejected 3000+10i..)
and its own lengths, so every row of every micro-batch can be traced back to its pair and side.
"""

from __future__ import annotations

import re

import pytest
import torch

from megatron_spin.errors import ConfigError
from megatron_spin.pairs import PreferenceBatch, PreferencePair, collate_pairs
from megatron_spin.train.batching import rank_micro_batches
from megatron_spin.train.config import BatchConfig

PAD = 7


def make_pair(i: int, longest: bool = False) -> PreferencePair:
    """Pair i: distinct ids per pair and side, varied lengths (``longest``: a longer chosen)."""
    prompt = tuple(1000 + 10 * i + j for j in range(1 + i % 3))
    chosen = tuple(2000 + 10 * i + j for j in range(1 + i % 4 + (6 if longest else 0)))
    rejected = tuple(3000 + 10 * i + j for j in range(2 + i % 2))
    return PreferencePair(
        prompt_id=f"p{i}",
        prompt_ids=prompt,
        chosen_ids=chosen,
        rejected_ids=rejected,
        chosen_reward=float(i) + 0.5,
        rejected_reward=float(i) - 0.5,
        weight_version=i,
    )


def make_batch(num_pairs: int) -> tuple[list[PreferencePair], PreferenceBatch]:
    # The last pair is the longest, so rank 0 (first pairs) never sets the global length itself.
    pairs = [make_pair(i, longest=(i == num_pairs - 1)) for i in range(num_pairs)]
    return pairs, collate_pairs(pairs, pad_id=PAD)


def expected_row(pair: PreferencePair, side: str, seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    prompt, response = pair.prompt_ids, getattr(pair, f"{side}_ids")
    tokens = torch.full((seq_length,), PAD, dtype=torch.long)
    tokens[: len(prompt) + len(response)] = torch.tensor(prompt + response)
    mask = torch.zeros(seq_length)
    mask[len(prompt) - 1 : len(prompt) + len(response) - 1] = 1.0
    return tokens, mask


def pair_index_of_row(tokens: torch.Tensor) -> tuple[int, str]:
    """Recover (pair index, side) from a row's response ids alone."""
    response = [t for t in tokens.tolist() if t >= 2000]
    side = "chosen" if response[0] < 3000 else "rejected"
    return (response[0] - (2000 if side == "chosen" else 3000)) // 10, side


GEOMETRIES = [
    # (global_pairs, micro_pairs, dp)
    (8, 1, 1),
    (8, 2, 1),
    (8, 8, 1),
    (8, 1, 2),
    (8, 2, 2),
    (8, 4, 2),
    (8, 1, 4),
    (8, 2, 4),
    (8, 1, 8),
    (6, 3, 2),
    (6, 1, 3),
    (12, 2, 3),
    (12, 3, 2),
]


@pytest.mark.parametrize("global_pairs, micro_pairs, dp", GEOMETRIES)
def test_each_rank_gets_its_contiguous_slice(global_pairs, micro_pairs, dp):
    pairs, batch = make_batch(global_pairs)
    cfg = BatchConfig(global_pairs, micro_pairs)
    per_rank = global_pairs // dp
    k = micro_pairs
    for rank in range(dp):
        mbs = rank_micro_batches(batch, cfg, rank, dp)
        assert len(mbs) == cfg.micro_batches_per_rank(dp) == per_rank // k
        for m, mb in enumerate(mbs):
            assert isinstance(mb, PreferenceBatch)
            assert mb.num_pairs == k
            assert mb.tokens.shape == (2 * k, batch.seq_length)  # the global sequence length
            assert mb.seq_length == batch.seq_length
            assert mb.loss_mask.shape == mb.tokens.shape and mb.loss_mask.dtype == batch.loss_mask.dtype
            assert mb.pad_id == PAD
            first = rank * per_rank + m * k
            idx = list(range(first, first + k))
            assert mb.pair_prompt_ids == tuple(f"p{i}" for i in idx)
            assert mb.chosen_rewards == tuple(float(i) + 0.5 for i in idx)
            assert mb.rejected_rewards == tuple(float(i) - 0.5 for i in idx)
            # Chosen-first layout: rows [:k] chosen of pairs idx, rows [k:] rejected of the same.
            for j, i in enumerate(idx):
                for row, side in ((j, "chosen"), (k + j, "rejected")):
                    tokens, mask = expected_row(pairs[i], side, batch.seq_length)
                    torch.testing.assert_close(mb.tokens[row], tokens, rtol=0, atol=0)
                    torch.testing.assert_close(mb.loss_mask[row], mask, rtol=0, atol=0)
                    assert mb.response_lengths[row].item() == len(getattr(pairs[i], f"{side}_ids"))
                    assert pair_index_of_row(mb.tokens[row]) == (i, side)
                # The same rows as in the global batch (global rows i and P + i).
                assert torch.equal(mb.tokens[j], batch.tokens[i])
                assert torch.equal(mb.tokens[k + j], batch.tokens[global_pairs + i])


@pytest.mark.parametrize("global_pairs, micro_pairs, dp", GEOMETRIES)
def test_all_ranks_cover_every_pair_exactly_once(global_pairs, micro_pairs, dp):
    _, batch = make_batch(global_pairs)
    cfg = BatchConfig(global_pairs, micro_pairs)
    seen_chosen, seen_rejected = [], []
    for rank in range(dp):
        for mb in rank_micro_batches(batch, cfg, rank, dp):
            k = mb.num_pairs
            chosen = [pair_index_of_row(r) for r in mb.tokens[:k]]
            rejected = [pair_index_of_row(r) for r in mb.tokens[k:]]
            assert all(side == "chosen" for _, side in chosen)
            assert all(side == "rejected" for _, side in rejected)
            # Each pair's two rows travel together, in the same order.
            assert [i for i, _ in chosen] == [i for i, _ in rejected]
            seen_chosen += [i for i, _ in chosen]
            seen_rejected += [i for i, _ in rejected]
    assert seen_chosen == list(range(global_pairs))  # every pair once, in rank-major order
    assert seen_rejected == list(range(global_pairs))
    # Total response tokens are conserved by the split.
    total = sum(
        mb.loss_mask.sum().item() for rank in range(dp) for mb in rank_micro_batches(batch, cfg, rank, dp)
    )
    assert total == batch.loss_mask.sum().item() == batch.response_lengths.sum().item()


def test_split_does_not_depend_on_dp_size_for_the_union():
    # The same global batch split 1-, 2- and 4-way yields the same sequence of micro-batches.
    _, batch = make_batch(8)
    cfg = BatchConfig(8, 2)
    reference = [mb.tokens for mb in rank_micro_batches(batch, cfg, 0, 1)]
    for dp in (2, 4):
        split = [mb.tokens for r in range(dp) for mb in rank_micro_batches(batch, cfg, r, dp)]
        assert len(split) == len(reference)
        for a, b in zip(split, reference):
            assert torch.equal(a, b)


def test_input_batch_not_modified():
    _, batch = make_batch(8)
    tokens, mask = batch.tokens.clone(), batch.loss_mask.clone()
    for mb in rank_micro_batches(batch, BatchConfig(8, 2), 1, 2):
        mb.tokens.fill_(0)
        mb.loss_mask.fill_(0)
    assert torch.equal(batch.tokens, tokens) and torch.equal(batch.loss_mask, mask)


@pytest.mark.parametrize("batch_pairs, global_pairs", [(8, 4), (4, 8), (6, 8), (8, 16)])
def test_global_pairs_mismatch(batch_pairs, global_pairs):
    _, batch = make_batch(batch_pairs)
    with pytest.raises(ConfigError, match=re.escape(f"global_pairs: the batch holds {batch_pairs} pairs, "
                                                    f"global_pairs={global_pairs}")) as info:
        rank_micro_batches(batch, BatchConfig(global_pairs, 1), 0, 1)
    assert info.value.key == "global_pairs"


@pytest.mark.parametrize(
    "global_pairs, micro_pairs, dp",
    [(8, 3, 1), (8, 1, 3), (6, 2, 2), (8, 16, 1), (8, 2, 8), (7, 1, 2)],
)
def test_indivisible_geometry(global_pairs, micro_pairs, dp):
    _, batch = make_batch(global_pairs)
    cfg = BatchConfig(global_pairs, micro_pairs)
    for rank in range(dp):
        with pytest.raises(ConfigError, match=re.escape("global_pairs: rule global_pairs % (micro_pairs * DP) == 0 "
                                                        f"violated: global_pairs={global_pairs}, "
                                                        f"micro_pairs={micro_pairs}, DP={dp}")) as info:
            rank_micro_batches(batch, cfg, rank, dp)
        assert info.value.key == "global_pairs"


@pytest.mark.parametrize("dp_rank", [-1, 2, 5])
def test_rank_out_of_range(dp_rank):
    _, batch = make_batch(8)
    with pytest.raises(ValueError):
        rank_micro_batches(batch, BatchConfig(8, 2), dp_rank, 2)


def test_short_rank_keeps_global_sequence_length():
    # Rank 0 holds only short pairs; its micro-batches are still padded to the global length.
    _, batch = make_batch(8)
    mbs = rank_micro_batches(batch, BatchConfig(8, 2), 0, 2)
    own_longest = max(int((mb.tokens != PAD).sum(dim=1).max()) for mb in mbs)
    assert own_longest < batch.seq_length
    assert all(mb.seq_length == batch.seq_length for mb in mbs)


def test_padded_to_adds_weightless_pairs_and_the_loss_scale():
    """Six pairs padded to eight: two copies of pair 0 with weight 0, chosen rows still first, and
    loss_scale = 8/6 (each micro-batch's mean x scale = the mean over the six real pairs)."""
    _, batch = make_batch(6)
    padded = batch.padded_to(4)
    assert padded.num_pairs == 8 and padded.pair_weights.tolist() == [1.0] * 6 + [0.0] * 2
    assert padded.loss_scale == 8 / 6
    assert torch.equal(padded.tokens[:6], batch.tokens[:6]) and torch.equal(padded.tokens[8:14], batch.tokens[6:])
    assert torch.equal(padded.tokens[6], batch.tokens[0]) and torch.equal(padded.tokens[14], batch.tokens[6])
    assert padded.pair_prompt_ids[6:] == ("<padding>", "<padding>")
    assert batch.padded_to(3) is batch  # already whole
    again = padded.padded_to(5)  # a padded batch padded further: the scale stays padded / real
    assert again.num_pairs == 10 and again.loss_scale == 10 / 6 and again.pair_weights.sum() == 6
    mbs = padded.split_micro_batches(4)
    assert [mb.pair_weights.tolist() for mb in mbs] == [[1.0] * 4, [1.0, 1.0, 0.0, 0.0]]
    assert all(mb.loss_scale == 8 / 6 for mb in mbs)
