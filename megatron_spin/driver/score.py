"""From engine completions to scored samples: decode, ask the reward source, keep the versions.

The trainer scores exactly the tokens the engine produced (``output_ids``, which end with EOS
when the engine stopped on it); the reward source sees the decoded text (special tokens
dropped) with the prompt's text, reference answer and metadata from the data file.
"""

from __future__ import annotations

from typing import Sequence

from megatron_spin.data.prompts import EncodedPrompt
from megatron_spin.pairs import ScoredSample
from megatron_spin.reward import RewardInput, RewardSource
from megatron_spin.rollout.protocol import Completion


def score_completions(prompts: Sequence[EncodedPrompt], completions: Sequence[Sequence[Completion]], tokenizer,
                      reward: RewardSource, id_prefix: str = "") -> list[list[ScoredSample]]:
    """``[prompt][sample]`` scored samples, in the order of ``prompts``."""
    flat = [(i, c) for i, group in enumerate(completions) for c in group]
    texts = tokenizer.batch_decode([list(c.output_ids) for _, c in flat], skip_special_tokens=True)
    inputs = [RewardInput(prompts[i].record.text, text, prompts[i].record.answer, prompts[i].record.metadata)
              for (i, _), text in zip(flat, texts)]
    rewards = reward(inputs)
    out: list[list[ScoredSample]] = [[] for _ in prompts]
    for (i, c), text, r in zip(flat, texts, rewards):
        out[i].append(ScoredSample(
            prompt_id=f"{id_prefix}{prompts[i].record.where}", prompt_ids=prompts[i].input_ids,
            response_ids=c.output_ids, reward=r, finished=c.finish_reason == "stop",
            weight_version=_version(c.weight_version), response_text=text,
        ))
    return out


def _version(v: str):
    try:
        return int(v)
    except ValueError:
        return None
