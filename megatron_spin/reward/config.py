"""Which reward source scores a run's samples (the ``reward_model`` section)."""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional
from urllib.parse import urlsplit

from megatron_spin.errors import coerce_enums, require


class RewardType(enum.StrEnum):
    VADER = "vader"  # VADER sentiment of the response (vaderSentiment)
    MATH = "math"  # the response's final answer checked by reasoning-gym
    HF = "hf"  # an HF sequence-classification reward model, in Ray reward workers
    HTTP = "http"  # a remote scorer
    FUNCTION = "function"  # a Python function "package.module:function"


@dataclasses.dataclass(frozen=True)
class RewardConfig:
    type: RewardType = RewardType.VADER
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

    def __post_init__(self) -> None:
        coerce_enums(self, type=RewardType)
        needs = {RewardType.HF: "path", RewardType.HTTP: "url", RewardType.FUNCTION: "function"}.get(self.type)
        if needs:
            require(bool(getattr(self, needs)), needs, f"required with type={self.type}")
        if self.type == RewardType.HTTP:
            url = urlsplit(self.url)
            require(url.scheme in ("http", "https") and bool(url.netloc), "url",
                    f"an http:// or https:// URL with a host, got {self.url!r}")
        for key in ("batch_size", "num_workers"):
            require(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        require(math.isfinite(self.timeout) and self.timeout > 0, "timeout", f"must be > 0, got {self.timeout}")
        require(self.retries >= 0, "retries", f"must be >= 0, got {self.retries}")
