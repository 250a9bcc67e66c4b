"""Rule rewards shipped in packages: VADER sentiment and reasoning-gym answer checking.

* :class:`VaderSentiment` — the VADER ``compound`` score of the response in ``[-1, 1]``
  (lexicon and rules, ~0.1 ms per text): the embedded default trains towards positive reviews.
* :class:`MathAnswer` — extracts the final answer (``<answer>…</answer>``, else the last
  number) and scores it with reasoning-gym's ``score_answer`` for the task the prompt came
  from (``metadata["source_dataset"]``, default ``basic_arithmetic``) against the reference
  answer: 1.0 correct, 0.0 wrong, partial credit where the task defines it.
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

from megatron_spin.reward.base import RewardError, RewardInput, RewardSource


class VaderSentiment(RewardSource):
    name = "vader"

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self._analyzer = SentimentIntensityAnalyzer()

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        return [self._analyzer.polarity_scores(x.response)["compound"] for x in inputs]


_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S | re.I)
_NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:/\d+)?")


def extract_answer(response: str) -> Optional[str]:
    """The text inside the last ``<answer>`` tag, else the last number in the response."""
    tags = _ANSWER_TAG.findall(response)
    if tags:
        return tags[-1].strip()
    numbers = _NUMBER.findall(response)
    return numbers[-1] if numbers else None


class MathAnswer(RewardSource):
    name = "math"

    def __init__(self, default_task: str = "basic_arithmetic"):
        import reasoning_gym

        self._rg = reasoning_gym
        self._default_task = default_task
        self._scorers: dict[str, object] = {}

    def _scorer(self, task: str):
        if task not in self._scorers:
            try:
                self._scorers[task] = self._rg.create_dataset(task, size=1, seed=0)
            except (KeyError, ValueError) as exc:
                raise RewardError(f"math reward: reasoning-gym has no task {task!r} ({exc})") from None
        return self._scorers[task]

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        out = []
        for i, x in enumerate(inputs):
            if x.reference is None:
                raise RewardError(f"math reward: sample {i} has no reference answer (the prompt file needs 'answer')")
            task = str(x.metadata.get("source_dataset") or self._default_task)
            entry = {"question": x.prompt, "answer": x.reference, "metadata": dict(x.metadata)}
            answer = extract_answer(x.response)
            out.append(0.0 if answer is None else float(self._scorer(task).score_answer(answer, entry)))
        return out
