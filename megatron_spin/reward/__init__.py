"""Reward sources behind one interface (:class:`RewardSource`), built from the ``reward_model`` section."""

from __future__ import annotations

from megatron_spin.reward.base import RewardError, RewardInput, RewardSource
from megatron_spin.reward.config import RewardConfig, RewardType
from megatron_spin.reward.function import FunctionReward
from megatron_spin.reward.http import HTTPReward
from megatron_spin.reward.rules import MathAnswer, VaderSentiment

REWARD_TYPES = tuple(t.value for t in RewardType)


def build_reward(cfg: RewardConfig) -> RewardSource:
    # Each source imports its own library (vaderSentiment, reasoning-gym, transformers) when built.
    if cfg.type == RewardType.VADER:
        return VaderSentiment()
    if cfg.type == RewardType.MATH:
        return MathAnswer(cfg.math_task)
    if cfg.type == RewardType.HF:
        from megatron_spin.reward.hf_model import HFRewardModel  # torch: only where a model scores

        return HFRewardModel(cfg.path, batch_size=cfg.batch_size)
    if cfg.type == RewardType.HTTP:
        return HTTPReward(cfg.url, timeout=cfg.timeout, retries=cfg.retries, batch_size=cfg.batch_size,
                          api_key=cfg.api_key)
    return FunctionReward(cfg.function, cfg.batched)


__all__ = ["REWARD_TYPES", "RewardConfig", "RewardError", "RewardInput", "RewardSource", "RewardType", "build_reward"]
