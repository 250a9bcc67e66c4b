"""A remote reward service over HTTP: POST a batch, get one score per sample back.

Request ``{"inputs": [{"prompt", "response", "reference", "metadata"}, ...]}``, reply
``{"rewards": [float, ...]}`` in the same order.  Batches of at most ``batch_size`` samples;
each request has a timeout and is retried a bounded number of times (connection errors and
502/503/504, with exponential backoff); anything else is a :class:`RewardError` naming the
URL and the reply.  An optional bearer token is sent when configured.
"""

from __future__ import annotations

import time
from typing import Optional, Sequence

import requests

from megatron_spin.reward.base import RewardError, RewardInput, RewardSource

_RETRY = frozenset({502, 503, 504})


class HTTPReward(RewardSource):
    name = "http"

    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, backoff: float = 0.5,
                 batch_size: int = 64, api_key: Optional[str] = None):
        self.url, self.timeout, self.retries, self.backoff, self.batch_size = url, timeout, retries, backoff, batch_size
        self._session = requests.Session()
        if api_key:
            self._session.headers["Authorization"] = f"Bearer {api_key}"

    def _post(self, payload: dict) -> dict:
        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                reply = self._session.post(self.url, json=payload, timeout=self.timeout)
            except (requests.ConnectionError, requests.Timeout) as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if reply.status_code in _RETRY:
                last = f"HTTP {reply.status_code}"
                continue
            if reply.status_code != 200:
                raise RewardError(f"reward service {self.url}: HTTP {reply.status_code}: {reply.text[:300]}")
            try:
                return reply.json()
            except ValueError:
                raise RewardError(f"reward service {self.url}: reply is not JSON: {reply.text[:300]}") from None
        raise RewardError(f"reward service {self.url}: {last} (after {self.retries + 1} attempts)")

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(inputs), self.batch_size):
            chunk = inputs[start:start + self.batch_size]
            body = self._post({"inputs": [{"prompt": x.prompt, "response": x.response, "reference": x.reference,
                                           "metadata": dict(x.metadata)} for x in chunk]})
            rewards = body.get("rewards") if isinstance(body, dict) else None
            if not isinstance(rewards, list) or len(rewards) != len(chunk):
                raise RewardError(f"reward service {self.url}: expected 'rewards' with {len(chunk)} numbers, "
                                  f"got {str(body)[:300]}")
            out += rewards
        return out

    def close(self) -> None:
        self._session.close()
