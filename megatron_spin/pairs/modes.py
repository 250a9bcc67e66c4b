"""The pairing modes (``algorithm.pairs``'s enums): how samples become pairs, what a tie makes,
which SPIN samples are used, what happens to an over-long sequence.  Plain enums without torch:
the run config validates them in processes that never build a batch."""

from __future__ import annotations

import enum


class PairStrategy(enum.StrEnum):
    """How a prompt's scored samples become pairs."""

    BEST_VS_WORST = "best_vs_worst"  # one pair per prompt: max reward vs min reward
    ALL_PAIRS = "all_pairs"  # every sample pair whose rewards differ by more than the margin


class TieRule(enum.StrEnum):
    """What a comparison whose rewards tie (within the margin) makes."""

    SKIP = "skip"  # no pair: preferring one of two equally good answers trains on noise
    # A pair anyway, the earlier sample chosen (TRL's rule).  Only with a zero margin: within a
    # margin the earlier sample may be the worse one.  Token-identical samples pair too (TRL's
    # behaviour): such a pair has zero gradient and counts in the mean, as there.
    FIRST = "first"


class SpinSelection(enum.StrEnum):
    """Which policy samples of a prompt become SPIN rejected responses."""

    ALL = "all"  # one pair per policy sample that differs from the ground truth
    FIRST = "first"  # only the first such sample: one pair per prompt


class Truncation(enum.StrEnum):
    """What to do with a sequence longer than ``max_length``."""

    ERROR = "error"  # refuse: silently cutting responses changes what is being preferred
    RIGHT = "right"  # cut the end of the response; the prompt is never truncated
