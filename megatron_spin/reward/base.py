"""The reward interface: a batch of (prompt, response[, reference]) in, one float per sample out.

Every source — rule functions, a Hugging Face reward model, a remote HTTP scorer, a user
function — implements :class:`RewardSource`.  Sources see text only (the trainer decodes
token ids once); they never see parallel state or tensors of the trainer.  A source that
cannot score raises :class:`RewardError` naming the sample, it never returns a silent 0.
"""

from __future__ import annotations

import abc
import dataclasses
import math
from typing import Mapping, Optional, Sequence


class RewardError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class RewardInput:
    prompt: str  # the user-visible prompt text (before the chat template)
    response: str  # the decoded response
    reference: Optional[str] = None  # ground-truth answer, when the data has one
    metadata: Mapping = dataclasses.field(default_factory=dict)  # per-prompt fields from the data file


class RewardSource(abc.ABC):
    name = "reward"

    @abc.abstractmethod
    def score(self, inputs: Sequence[RewardInput]) -> list[float]: ...

    def close(self) -> None:
        pass

    def __call__(self, inputs: Sequence[RewardInput]) -> list[float]:
        scores = self.score(inputs)
        if len(scores) != len(inputs):
            raise RewardError(f"{self.name}: {len(scores)} scores for {len(inputs)} samples")
        out = []
        for i, s in enumerate(scores):
            try:
                value = float(s)
            except (TypeError, ValueError):
                raise RewardError(f"{self.name}: score {i} is {s!r}, not a number") from None
            if not math.isfinite(value):
                raise RewardError(f"{self.name}: score {i} is {value} for response {inputs[i].response[:80]!r}")
            out.append(value)
        return out
