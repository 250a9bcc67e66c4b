"""Reward sources behind one interface (:class:`RewardSource`), built from ``reward_model`` config."""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_spin.config.optim import ConfigError
from megatron_spin.reward.base import RewardError, RewardInput, RewardSource

REWARD_TYPES = ("vader", "math", "hf", "http", "function")


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    type: str = "vader"
    path: Optional[str] = None  # hf: the reward model directory
    url: Optional[str] = None  # http: the scoring endpoint
    function: Optional[str] = None  # function: "package.module:function"
    batched: bool = False  # function: called with the whole batch
    batch_size: int = 16  # hf / http: samples per forward / request
    timeout: float = 60.0  # http: seconds per request
    retries: int = 3  # http: bounded retries
    api_key: Optional[str] = None  # http: bearer token
    math_task: str = "basic_arithmetic"  # math: reasoning-gym task when the data names none
    num_workers: int = 1  # hf: Ray reward workers

    def __post_init__(self):
        w = "reward_model"
        if self.type not in REWARD_TYPES:
            raise ConfigError(f"{w}.type={self.type!r} is not one of {REWARD_TYPES}")
        needs = {"hf": "path", "http": "url", "function": "function"}.get(self.type)
        if needs and not getattr(self, needs):
            raise ConfigError(f"{w}.{needs} is required with {w}.type={self.type}")
        for key in ("batch_size", "num_workers"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{w}.{key}={getattr(self, key)} must be >= 1")
        if self.timeout <= 0 or self.retries < 0:
            raise ConfigError(f"{w}.timeout must be > 0 and {w}.retries >= 0")


def build_reward(cfg: RewardConfig) -> RewardSource:
    if cfg.type == "vader":
        from megatron_spin.reward.rules import VaderSentiment

        return VaderSentiment()
    if cfg.type == "math":
        from megatron_spin.reward.rules import MathAnswer

        return MathAnswer(cfg.math_task)
    if cfg.type == "hf":
        from megatron_spin.reward.hf_model import HFRewardModel

        return HFRewardModel(cfg.path, batch_size=cfg.batch_size)
    if cfg.type == "http":
        from megatron_spin.reward.http import HTTPReward

        return HTTPReward(cfg.url, timeout=cfg.timeout, retries=cfg.retries, batch_size=cfg.batch_size,
                          api_key=cfg.api_key)
    from megatron_spin.reward.function import FunctionReward

    return FunctionReward(cfg.function, cfg.batched)


__all__ = ["REWARD_TYPES", "RewardConfig", "RewardError", "RewardInput", "RewardSource", "build_reward"]
