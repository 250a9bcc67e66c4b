"""Reward workers: a reward source that needs its own memory (an HF reward model) runs in Ray actors.

``RewardPool`` splits a batch into one contiguous share per worker, scores the shares
concurrently and returns the scores in input order.  Rule rewards (VADER, math answers, a
function) are cheap and run in the driver: ``build_reward_pool`` only starts workers for
``reward_model.type=hf``.  Where the workers go is the placement's decision: one CPU each on
CPU runs; on GPU runs they share trainer GPUs, pinned by device id (unverified on GPU).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

from megatron_spin.platform.devices import physical_gpu_ids
from megatron_spin.reward import RewardConfig, RewardInput, RewardSource, build_reward


class _RewardWorker:
    def __init__(self, cfg: RewardConfig, gpu_ids: Optional[Sequence[int]] = None):
        if gpu_ids is not None:  # pragma: no cover - GPU tier: before anything initialises CUDA

            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(physical_gpu_ids(gpu_ids))
        self.source = build_reward(cfg)

    def score(self, inputs: Sequence[RewardInput]) -> list[float]:
        return self.source(inputs)


class RewardPool(RewardSource):
    name = "reward_pool"

    def __init__(self, cfg: RewardConfig, placements: Sequence[tuple[dict, Optional[Sequence[int]]]],
                 timeout_s: float = 600.0):
        """``placements``: per worker, its Ray actor options and the GPU ids it pins (or None)."""
        import ray

        cls = ray.remote(_RewardWorker)
        self.workers = [cls.options(**options).remote(cfg, gpu_ids) for options, gpu_ids in placements]
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


def build_reward_pool(cfg: RewardConfig, timeout_s: float,
                      placements: Optional[Sequence[tuple[dict, Optional[Sequence[int]]]]] = None) -> RewardSource:
    """Ray workers for a reward model, the source itself for rules (needs Ray started for hf).
    Without ``placements``: ``cfg.num_workers`` workers of one CPU each."""
    if cfg.type != "hf":
        return build_reward(cfg)
    return RewardPool(cfg, placements or [({"num_cpus": 1}, None)] * cfg.num_workers, timeout_s)
