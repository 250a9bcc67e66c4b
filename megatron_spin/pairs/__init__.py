"""Preference pairs: scored samples → (chosen, rejected) pairs → padded DPO/SPIN batches.

Online DPO pairs each prompt's ``n >= 2`` scored policy samples (best vs worst, or all pairs
beyond a reward margin); SPIN pairs the dataset's ground-truth response (chosen) with the
policy's own samples (rejected). Ties in reward produce no pair; they are counted in
:class:`PairStats`. See :mod:`megatron_spin.pairs.builder` for the rules and
:class:`PreferenceBatch` for the tensor layout and the loss-mask shift convention.
"""

from megatron_spin.pairs.modes import PairStrategy, SpinSelection, TieRule, Truncation

# The records and builders hold and make tensors; the modes (read by the run config) do not, so the
# rest is imported on first use.
_LAZY = {"build_pairs": "builder", "build_spin_pairs": "builder", "collate_pairs": "builder",
         "PairStats": "records", "PreferenceBatch": "records", "PreferencePair": "records", "ScoredSample": "records"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"megatron_spin.pairs.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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
