"""Reward workers: a reward source that needs its own memory (an HF reward model) runs in Ray actors.

``RewardPool`` splits a batch into one contiguous share per worker, scores the shares
concurrently and returns the scores in input order.  Rule rewards (VADER, math answers, a
function) are cheap and run in the driver: ``build_reward_pool`` only starts workers for
``reward_model.type=hf``.
"""

from __future__ import annotations

from typing import Sequence

from megatron_spin.reward import RewardConfig, RewardInput, RewardSource, build_reward


class _RewardWorker:
    def __init__(self, cfg: RewardConfig):
        self.source = build_reward(cfg)

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        return self.source(inputs)


class RewardPool(RewardSource):
    name = "reward_pool"

    def __init__(self, cfg: RewardConfig, num_workers: int, timeout_s: float = 600.0, gpus_per_worker: float = 0.0):
        import ray

        cls = ray.remote(_RewardWorker)
        self.workers = [cls.options(num_cpus=1, num_gpus=gpus_per_worker).remote(cfg) for _ in range(num_workers)]
        self.timeout_s = timeout_s

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        import ray

        n = len(self.workers)
        q, r = divmod(len(inputs), n)
        shares, start = [], 0
        for k in range(n):
            size = q + (1 if k < r else 0)
            shares.append(list(inputs[start:start + size]))
            start += size
        refs = [w.score.remote(s) for w, s in zip(self.workers, shares) if s]
        return [x for part in ray.get(refs, timeout=self.timeout_s) for x in part]

    def close(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)


def build_reward_pool(cfg: RewardConfig, gpus: bool, timeout_s: float) -> RewardSource:
    """Ray workers for a reward model, the source itself for rules (needs Ray started for hf)."""
    if cfg.type != "hf":
        return build_reward(cfg)
    return RewardPool(cfg, cfg.num_workers, timeout_s, gpus_per_worker=1.0 if gpus else 0.0)
