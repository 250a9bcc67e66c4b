"""Pair building (best-vs-worst, all-pairs, ties, margin, unfinished penalty, SPIN) and collation."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_spin.pairs import (
    PairStats,
    PairStrategy,
    PreferenceBatch,
    PreferencePair,
    ScoredSample,
    build_pairs,
    build_spin_pairs,
    collate_pairs,
)

PROMPT = (11, 12, 13)


def group(rewards, prompt_id="p0", finished=None, responses=None, versions=None):
    """One prompt's samples; response i is (100 + i,) unless given, so responses are distinct."""
    n = len(rewards)
    finished = finished or [True] * n
    responses = responses or [(100 + i,) for i in range(n)]
    versions = versions or [None] * n
    return [
        ScoredSample(prompt_id, PROMPT, responses[i], rewards[i], finished[i], weight_version=versions[i])
        for i in range(n)
    ]


def summary(pairs):
    return [(p.chosen_reward, p.rejected_reward) for p in pairs]


# ---------------------------------------------------------------------------------- records


def test_records_coerce_and_validate():
    s = ScoredSample("p", [1, 2], [3], 1, 1)
    assert s.prompt_ids == (1, 2) and s.response_ids == (3,) and s.reward == 1.0 and s.finished is True
    with pytest.raises(ValueError, match="'p'.*finite"):
        ScoredSample("p", [1], [2], float("nan"), True)
    with pytest.raises(ValueError, match="negative token id"):
        ScoredSample("p", [1], [-1], 0.0, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.reward = 2.0  # type: ignore[misc]


def test_pair_stats_add_and_metrics():
    a = PairStats(prompts=2, samples=8, pairs=1, ties_skipped=1, prompts_without_pair=1,
                  unfinished_penalised=3)
    b = PairStats(prompts=1, samples=4, pairs=2, ties_skipped=0, prompts_without_pair=0,
                  unfinished_penalised=0)
    total = a + b
    assert total == PairStats(3, 12, 3, 1, 1, 3)
    assert sum([a, b]) == total and a.merge(b) == total and a.merge() == a
    metrics = total.as_metrics()
    assert set(metrics) == {
        "pairs/prompts", "pairs/samples", "pairs/kept", "pairs/ties_skipped", "pairs/ties_paired",
        "pairs/prompts_without_pair", "pairs/unfinished_penalised",
        "pairs/kept_per_prompt", "pairs/prompts_without_pair_frac",
    }
    assert metrics["pairs/kept"] == 3.0 and metrics["pairs/ties_skipped"] == 1.0
    assert metrics["pairs/prompts_without_pair_frac"] == pytest.approx(1 / 3)
    assert all(isinstance(v, float) for v in metrics.values())
    assert set(PairStats().as_metrics()) == set(metrics)  # same keys when empty, no NaN
    assert not any(math.isnan(v) for v in PairStats().as_metrics().values())


# ---------------------------------------------------------------------------- build_pairs


def test_best_vs_worst_picks_max_and_min():
    samples = group([0.2, 0.9, -0.5, 0.4])
    pairs, stats = build_pairs([samples], strategy="best_vs_worst")
    assert len(pairs) == 1
    (pair,) = pairs
    assert pair.chosen_ids == (101,) and pair.rejected_ids == (102,)
    assert (pair.chosen_reward, pair.rejected_reward) == (0.9, -0.5)
    assert pair.prompt_id == "p0" and pair.prompt_ids == PROMPT
    assert stats == PairStats(
        prompts=1, samples=4, pairs=1, ties_skipped=0, prompts_without_pair=0, unfinished_penalised=0
    )


def test_best_vs_worst_tie_break_is_first_occurrence():
    pairs, _ = build_pairs([group([1.0, 3.0, 3.0, 1.0])], strategy=PairStrategy.BEST_VS_WORST)
    assert pairs[0].chosen_ids == (101,) and pairs[0].rejected_ids == (100,)


def test_ties_give_no_pair_and_are_counted():
    groups = [group([0.5] * 4, "all_equal"), group([1.0, 1.0], "two_equal"), group([0.0, 1.0], "ok")]
    pairs, stats = build_pairs(groups, strategy="best_vs_worst")
    assert [p.prompt_id for p in pairs] == ["ok"]
    assert stats.ties_skipped == 2 and stats.prompts_without_pair == 2 and stats.pairs == 1
    assert stats.prompts == 3 and stats.samples == 8

    pairs, stats = build_pairs([group([0.5] * 4)], strategy="all_pairs")
    assert pairs == [] and stats.ties_skipped == 6 and stats.prompts_without_pair == 1


def test_identical_responses_are_a_tie_even_with_different_rewards():
    samples = group([1.0, 0.0], responses=[(7, 8), (7, 8)])
    pairs, stats = build_pairs([samples], strategy="best_vs_worst")
    assert pairs == [] and stats.ties_skipped == 1


def test_margin():
    # best - worst = 0.3
    samples = group([0.5, 0.2, 0.4])
    assert len(build_pairs([samples], strategy="best_vs_worst", margin=0.29)[0]) == 1
    pairs, stats = build_pairs([samples], strategy="best_vs_worst", margin=0.3)  # difference <= margin: tie
    assert pairs == [] and stats.ties_skipped == 1 and stats.prompts_without_pair == 1
    # all_pairs: differences 0.3 (0,1), 0.1 (0,2), 0.2 (2,1); margin 0.15 keeps the first and last.
    pairs, stats = build_pairs([samples], strategy="all_pairs", margin=0.15)
    assert [(p.chosen_ids, p.rejected_ids) for p in pairs] == [((100,), (101,)), ((102,), (101,))]
    assert stats.ties_skipped == 1
    with pytest.raises(ValueError, match="margin"):
        build_pairs([samples], strategy="all_pairs", margin=-0.1)


def test_all_pairs_known_example():
    pairs, stats = build_pairs([group([3.0, 1.0, 2.0, 2.0])], strategy="all_pairs")
    assert summary(pairs) == [(3.0, 1.0), (3.0, 2.0), (3.0, 2.0), (2.0, 1.0), (2.0, 1.0)]
    # Input-index order (i < j), higher reward chosen.
    assert [(p.chosen_ids[0] - 100, p.rejected_ids[0] - 100) for p in pairs] == [
        (0, 1), (0, 2), (0, 3), (2, 1), (3, 1),
    ]
    assert stats.pairs == 5 and stats.ties_skipped == 1 and stats.prompts_without_pair == 0
    # Deterministic: same input, same output.
    assert build_pairs([group([3.0, 1.0, 2.0, 2.0])], strategy="all_pairs")[0] == pairs


def test_unfinished_penalty_changes_the_winner():
    samples = group([1.0, 0.5, 0.0], finished=[False, True, True])
    pairs, stats = build_pairs([samples], strategy="best_vs_worst")
    assert pairs[0].chosen_ids == (100,) and stats.unfinished_penalised == 0
    pairs, stats = build_pairs([samples], strategy="best_vs_worst", unfinished_penalty=2.0)
    # Effective rewards [-1.0, 0.5, 0.0]: sample 1 wins, the truncated sample 0 loses.
    assert pairs[0].chosen_ids == (101,) and pairs[0].rejected_ids == (100,)
    assert (pairs[0].chosen_reward, pairs[0].rejected_reward) == (0.5, -1.0)
    assert stats.unfinished_penalised == 1


def test_pair_weight_version_is_the_oldest():
    pairs, _ = build_pairs([group([1.0, 0.0], versions=[5, 3])], strategy="best_vs_worst")
    assert pairs[0].weight_version == 3
    pairs, _ = build_pairs([group([1.0, 0.0], versions=[None, 4])], strategy="best_vs_worst")
    assert pairs[0].weight_version == 4


def test_build_pairs_input_errors():
    with pytest.raises(ValueError, match="'lonely'.*1 sample"):
        build_pairs([group([0.0, 1.0]), group([1.0], "lonely")], strategy="all_pairs")
    with pytest.raises(ValueError, match="mixes prompt_ids"):
        build_pairs([group([0.0], "a") + group([1.0], "b")], strategy="all_pairs")
    with pytest.raises(ValueError, match="best_vs_worst"):
        build_pairs([group([0.0, 1.0])], strategy="argmax")
    assert build_pairs([], strategy="all_pairs") == ([], PairStats())


# ------------------------------------------------------------------------------------- SPIN


def test_spin_pairs():
    gt = {"p0": [50, 51], "p1": (60,)}
    groups = [
        group([0.0, 0.0, 0.0], "p0", responses=[(1,), (50, 51), (2, 3)], versions=[7, 7, 8]),
        group([0.0], "p1", responses=[(60,)]),
    ]
    pairs, stats = build_spin_pairs(groups, gt)
    assert [(p.prompt_id, p.chosen_ids, p.rejected_ids) for p in pairs] == [
        ("p0", (50, 51), (1,)), ("p0", (50, 51), (2, 3)),
    ]
    assert all(p.chosen_reward is None and p.rejected_reward is None for p in pairs)
    assert [p.weight_version for p in pairs] == [7, 8]
    assert stats == PairStats(
        prompts=2, samples=4, pairs=2, ties_skipped=2, prompts_without_pair=1, unfinished_penalised=0
    )

    pairs, stats = build_spin_pairs(groups, gt, per_prompt="first")
    assert [p.rejected_ids for p in pairs] == [(1,)] and stats.ties_skipped == 2

    with pytest.raises(KeyError, match="'p1'"):
        build_spin_pairs(groups, {"p0": [50]})
    with pytest.raises(ValueError, match="'p0'.*empty"):
        build_spin_pairs(groups, {"p0": [], "p1": [60]})


# ------------------------------------------------------------------------------------ collate


def make_pair(prompt_id, prompt, chosen, rejected, cr=1.0, rr=0.0):
    return PreferencePair(prompt_id, prompt, chosen, rejected, cr, rr, None)


def test_collate_exact_tokens_mask_lengths():
    pairs = [
        make_pair("a", (1, 2), (3, 4, 5), (6,), 1.0, 0.0),
        make_pair("b", (7,), (8,), (9, 10), None, None),
    ]
    batch = collate_pairs(pairs, pad_id=0)
    P = 0  # pad
    # Rows: chosen a, chosen b, rejected a, rejected b; S = 5 (longest: 2 + 3).
    assert batch.tokens.tolist() == [
        [1, 2, 3, 4, 5],
        [7, 8, P, P, P],
        [1, 2, 6, P, P],
        [7, 9, 10, P, P],
    ]
    # Position t is 1 iff token t+1 is a response token; the last column is always 0.
    assert batch.loss_mask.tolist() == [
        [0, 1, 1, 1, 0],
        [1, 0, 0, 0, 0],
        [0, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
    ]
    assert batch.labels.tolist() == [
        [2, 3, 4, 5, P],
        [8, P, P, P, P],
        [2, 6, P, P, P],
        [9, 10, P, P, P],
    ]
    assert batch.response_lengths.tolist() == [3, 1, 1, 2]
    assert batch.tokens.dtype == torch.long and batch.loss_mask.dtype == torch.float32
    assert torch.equal(batch.loss_mask.sum(1).long(), batch.response_lengths)
    assert batch.num_pairs == 2 and batch.seq_length == 5 and batch.pair_prompt_ids == ("a", "b")
    assert batch.chosen_rewards[0] == 1.0 and math.isnan(batch.chosen_rewards[1])
    assert batch.rejected_rewards[0] == 0.0 and math.isnan(batch.rejected_rewards[1])


def test_collate_right_padding_with_custom_pad_and_multiple():
    batch = collate_pairs([make_pair("a", (1,), (2, 3), (4,))], pad_id=99, pad_to_multiple_of=4)
    assert batch.tokens.tolist() == [[1, 2, 3, 99], [1, 4, 99, 99]]
    assert batch.loss_mask.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def test_micro_batch_split_keeps_pairs_together_chosen_first():
    pairs = [
        make_pair(f"p{i}", (i + 1,), (10 + i,) * (i + 1), (20 + i,), float(i), -float(i)) for i in range(4)
    ]
    batch = collate_pairs(pairs, pad_id=0)
    micro = batch.split_micro_batches(2)
    assert len(micro) == 2
    for m, mb in enumerate(micro):
        assert isinstance(mb, PreferenceBatch) and mb.num_pairs == 2
        assert mb.seq_length == batch.seq_length  # one shape for every micro-batch (PP)
        ids = [2 * m, 2 * m + 1]
        expected_rows = ids + [4 + i for i in ids]  # chosen of both pairs, then their rejected
        assert torch.equal(mb.tokens, batch.tokens[expected_rows])
        assert torch.equal(mb.loss_mask, batch.loss_mask[expected_rows])
        assert torch.equal(mb.response_lengths, batch.response_lengths[expected_rows])
        assert mb.pair_prompt_ids == tuple(f"p{i}" for i in ids)
        assert mb.chosen_rewards == tuple(float(i) for i in ids)
        # Row k and row k + 2 belong to the same pair: same prompt token, chosen then rejected.
        for k in range(2):
            assert mb.tokens[k, 0] == mb.tokens[k + 2, 0]
            assert mb.tokens[k, 1] == 10 + ids[k] and mb.tokens[k + 2, 1] == 20 + ids[k]
    with pytest.raises(ValueError, match="num_pairs % pairs_per_micro_batch"):
        batch.split_micro_batches(3)
    ragged = batch.split_micro_batches(3, allow_partial=True)
    assert [mb.num_pairs for mb in ragged] == [3, 1]
    assert ragged[1].tokens[:, 1].tolist() == [13, 23]
    moved = batch.to("cpu")
    assert torch.equal(moved.tokens, batch.tokens) and moved.num_pairs == batch.num_pairs


def test_truncation_modes_and_errors():
    pair = make_pair("long", (1, 2, 3), (4, 5, 6, 7), (8,))
    with pytest.raises(ValueError, match=r"'long'.*7 tokens.*prompt 3 \+ response 4.*max_length 5"):
        collate_pairs([pair], pad_id=0, max_length=5)
    batch = collate_pairs([pair], pad_id=0, max_length=5, truncate="right")
    assert batch.tokens.tolist() == [[1, 2, 3, 4, 5], [1, 2, 3, 8, 0]]
    assert batch.response_lengths.tolist() == [2, 1]
    assert batch.loss_mask.tolist() == [[0, 0, 1, 1, 0], [0, 0, 1, 0, 0]]
    with pytest.raises(ValueError, match="'long'.*prompt has 3 tokens >= max_length 3"):
        collate_pairs([pair], pad_id=0, max_length=3, truncate="right")
    assert collate_pairs([pair], pad_id=0, max_length=7).seq_length == 7  # fits exactly
    with pytest.raises(ValueError, match="truncate"):
        collate_pairs([pair], pad_id=0, max_length=5, truncate="left")


def test_collate_errors():
    with pytest.raises(ValueError, match="'e'.*empty rejected response"):
        collate_pairs([make_pair("e", (1,), (2,), ())], pad_id=0)
    with pytest.raises(ValueError, match="'e'.*empty prompt"):
        collate_pairs([make_pair("e", (), (2,), (3,))], pad_id=0)
    with pytest.raises(ValueError, match="no pairs"):
        collate_pairs([], pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        collate_pairs([make_pair("a", (1,), (2,), (3,))], pad_id=-100)


def test_end_to_end_pairs_to_batch():
    groups = [group([0.1, 0.7, 0.3], "x"), group([0.5, 0.5], "tie")]
    pairs, stats = build_pairs(groups, strategy="best_vs_worst")
    batch = collate_pairs(pairs, pad_id=0)
    assert batch.num_pairs == stats.pairs == 1
    assert batch.tokens.tolist() == [[11, 12, 13, 101], [11, 12, 13, 100]]
    assert batch.chosen_rewards == (0.7,) and batch.rejected_rewards == (0.1,)


def test_invariants_on_random_groups():
    """all_pairs: pairs + ties == n(n-1)/2 per prompt; every pair strictly beats the margin;
    collated rows have loss_mask sums equal to their response lengths."""
    gen = torch.Generator().manual_seed(0)
    for margin in (0.0, 0.5):
        groups = []
        for g in range(20):
            n = int(torch.randint(2, 7, (1,), generator=gen))
            rewards = torch.randint(0, 4, (n,), generator=gen).float().tolist()  # many ties
            lengths = torch.randint(1, 6, (n,), generator=gen).tolist()
            responses = [tuple(range(200 + 10 * i, 200 + 10 * i + lengths[i])) for i in range(n)]
            groups.append(group(rewards, f"g{g}", responses=responses))
        pairs, stats = build_pairs(groups, strategy="all_pairs", margin=margin)
        assert stats.pairs + stats.ties_skipped == sum(len(x) * (len(x) - 1) // 2 for x in groups)
        assert all(p.chosen_reward - p.rejected_reward > margin for p in pairs)
        batch = collate_pairs(pairs, pad_id=0, max_length=6, truncate="right")
        assert torch.equal(batch.loss_mask.sum(1).long(), batch.response_lengths)
        assert not batch.loss_mask[:, -1].any()


# --------------------------------------------------------------------------- tie rule "first"
def _group(rewards, prompt_id="p"):
    return [ScoredSample(prompt_id, (1, 2), (10 + i, 3), r, True) for i, r in enumerate(rewards)]


def test_tie_rule_first_pairs_ties_with_the_earlier_sample_chosen():
    """TRL's OnlineDPOTrainer rule for n=2 (chosen = first if r_first >= r_second):
    a tie still makes a pair.  The default ("skip") makes none."""
    groups = [_group([0.5, 0.5], "tie"), _group([0.1, 0.9], "clear"), _group([0.3, 0.3, 0.3], "all-equal")]
    skipped, s_stats = build_pairs(groups, strategy="best_vs_worst")
    assert [p.prompt_id for p in skipped] == ["clear"] and s_stats.ties_skipped == 2 and s_stats.ties_paired == 0
    pairs, stats = build_pairs(groups, strategy="best_vs_worst", ties="first")
    assert [p.prompt_id for p in pairs] == ["tie", "clear", "all-equal"]
    assert (pairs[0].chosen_ids, pairs[0].rejected_ids) == ((10, 3), (11, 3))  # sample 0 over sample 1
    assert (pairs[1].chosen_ids, pairs[1].rejected_ids) == ((11, 3), (10, 3))  # the higher reward wins
    assert (pairs[2].chosen_ids, pairs[2].rejected_ids) == ((10, 3), (11, 3))
    assert stats.ties_skipped == 0 and stats.ties_paired == 2 and stats.pairs == 3
    all_pairs, a_stats = build_pairs([_group([0.5, 0.5, 0.2])], strategy="all_pairs", ties="first")
    assert len(all_pairs) == 3 and a_stats.ties_paired == 1  # (0,1) tied: 0 chosen
    assert (all_pairs[0].chosen_ids, all_pairs[0].rejected_ids) == ((10, 3), (11, 3))
    with pytest.raises(ValueError, match="ties must be one of"):
        build_pairs(groups, strategy="best_vs_worst", ties="random")


def test_tie_rule_first_refuses_a_margin():
    """Within a margin the earlier sample may be the worse one: [0.1, 0.3] with margin 0.5 would
    prefer 0.1.  Refused by the builder and, naming the key, by the config."""
    from megatron_spin.errors import ConfigError
    from megatron_spin.pairs.config import PairConfig

    with pytest.raises(ValueError, match="exact ties only"):
        build_pairs([_group([0.1, 0.3])], strategy="best_vs_worst", margin=0.5, ties="first")
    with pytest.raises(ConfigError, match="ties"):
        PairConfig(min_margin=0.5, ties="first")
    assert PairConfig(min_margin=0.5).ties == "skip"
