"""Held-out evaluation: greedy answers to the held-out prompts, scored by the run's reward."""

from __future__ import annotations

from typing import Optional, Sequence

from megatron_spin.data.prompts import EncodedPrompt
from megatron_spin.driver.score import score_completions
from megatron_spin.metrics.logger import MetricLogger
from megatron_spin.reward import RewardSource
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.rollout.protocol import SamplingParams


class Evaluator:
    """Mean reward of greedy answers to ``prompts``, per step; ``results`` survives a resume."""

    def __init__(self, prompts: Sequence[EncodedPrompt], tokenizer, logger: MetricLogger, max_new_tokens: int):
        self.prompts, self.tokenizer, self.logger = list(prompts), tokenizer, logger
        self.results: dict[int, float] = {}
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        if not self.prompts:
            print("[data] no held-out prompts (data.val_files): held-out evaluation is off", flush=True)

    def __call__(self, step: int, fleet: RolloutFleet, reward: RewardSource) -> Optional[float]:
        if not self.prompts:
            return None
        groups = fleet.generate([x.input_ids for x in self.prompts], self.sampling)
        scored = score_completions(self.prompts, groups, self.tokenizer, reward, "val:")
        self.results[step] = sum(s[0].reward for s in scored) / len(scored)
        self.logger.log(step, {"reward/mean": self.results[step], "prompts": len(scored)}, kind="eval")
        return self.results[step]
