"""Preference pairs: scored samples → (chosen, rejected) pairs → padded DPO/SPIN batches.

Online DPO pairs each prompt's ``n >= 2`` scored policy samples (best vs worst, or all pairs
beyond a reward margin); SPIN pairs the dataset's ground-truth response (chosen) with the
policy's own samples (rejected). Ties in reward produce no pair; they are counted in
:class:`PairStats`. See :mod:`megatron_spin.pairs.builder` for the rules and
:class:`PreferenceBatch` for the tensor layout and the loss-mask shift convention.
"""

from megatron_spin.pairs.builder import (
    PairStrategy,
    SpinSelection,
    TieRule,
    Truncation,
    build_pairs,
    build_spin_pairs,
    collate_pairs,
)
from megatron_spin.pairs.records import PairStats, PreferenceBatch, PreferencePair, ScoredSample

__all__ = [
    "ScoredSample",
    "PreferencePair",
    "PairStats",
    "PreferenceBatch",
    "PairStrategy",
    "SpinSelection",
    "TieRule",
    "Truncation",
    "build_pairs",
    "build_spin_pairs",
    "collate_pairs",
]
