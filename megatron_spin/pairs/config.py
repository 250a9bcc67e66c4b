"""How a step's scored samples become preference pairs (``algorithm.pairs``)."""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

from megatron_spin.errors import coerce_enums, require
from megatron_spin.pairs.modes import PairStrategy, SpinSelection, TieRule


@dataclasses.dataclass(frozen=True)
class PairConfig:
    strategy: PairStrategy = PairStrategy.BEST_VS_WORST  # online DPO: best vs worst, or all pairs above a margin
    min_margin: float = 0.0  # a comparison whose reward difference is <= this is a tie
    ties: TieRule = TieRule.SKIP  # a tie makes no pair (skip), or one with the earlier sample chosen (first)
    unfinished_penalty: Optional[float] = None  # subtracted from samples cut off by the length limit
    spin_selection: SpinSelection = SpinSelection.FIRST  # SPIN: first differing sample per prompt, or all

    def __post_init__(self) -> None:
        coerce_enums(self, strategy=PairStrategy, spin_selection=SpinSelection, ties=TieRule)
        require(math.isfinite(self.min_margin) and self.min_margin >= 0, "min_margin",
                f"must be >= 0, got {self.min_margin}")
        require(self.ties is TieRule.SKIP or self.min_margin == 0, "ties",
                f"'first' needs min_margin=0 (got {self.min_margin}): within a margin the earlier sample "
                "may be the worse one")
        require(self.unfinished_penalty is None or (math.isfinite(self.unfinished_penalty)
                                                     and self.unfinished_penalty >= 0),
                "unfinished_penalty", f"must be >= 0 or null, got {self.unfinished_penalty}")
