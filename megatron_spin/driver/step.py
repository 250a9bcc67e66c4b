"""The step's pairs and the step's metrics record."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Callable, Iterator, Optional, Sequence

from megatron_spin.config.run import AlgorithmConfig
from megatron_spin.data.prompts import EncodedPrompt
from megatron_spin.pairs import PairStats, PreferencePair, ScoredSample, build_pairs, build_spin_pairs
from megatron_spin.rollout.fleet import FleetError, RolloutFleet
from megatron_spin.rollout.protocol import Completion, SamplingParams
from megatron_spin.rollout.staleness import check_versions

log = logging.getLogger(__name__)


class StepTimer:
    """Seconds per phase of a step (``timing/<phase>`` in the metrics), plus the whole step."""

    def __init__(self):
        self.started, self.seconds = time.monotonic(), {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.monotonic()
        yield
        self.seconds[phase] = time.monotonic() - t0

    def done(self) -> dict[str, float]:
        return {**self.seconds, "step": time.monotonic() - self.started}


def generate(fleet: RolloutFleet, prompts: Sequence[EncodedPrompt], sampling: SamplingParams, *, seed: int,
             version: int, max_lag: int, recover: Optional[Callable[[int], object]] = None) -> list[list[Completion]]:
    """``n`` samples per prompt from the fleet, refused if any came from weights older than allowed.
    ``seed`` makes samples depend only on (seed, prompt, weights): a resumed run draws what the
    uninterrupted one would have, and so does a step whose engines were restarted.

    ``recover(version)``: called when the fleet has no engine left, to restart the dead ones at
    ``version`` (it raises when none can be); the step's prompts are then generated again."""
    while True:
        try:
            groups = fleet.generate([p.input_ids for p in prompts], dataclasses.replace(sampling, seed=seed),
                                    return_logprob=False)
            break
        except FleetError as exc:
            if recover is None:
                raise
            log.warning("%s: restarting the dead engines", exc)
            recover(version)
    check_versions([c for g in groups for c in g], version, max_lag)
    return groups


def make_pairs(algo: AlgorithmConfig, prompts: Sequence[EncodedPrompt],
               scored: Sequence[Sequence[ScoredSample]]) -> tuple[list[PreferencePair], PairStats]:
    """Pairs for one update (best-vs-worst / all pairs above a margin, or SPIN's ground truth vs
    sample) and the builder's counts.  Every pair trains: the ranks pad to whole micro-batches
    with pairs that carry no loss."""
    cfg = algo.pairs
    if algo.spin:
        truth = {s[0].prompt_id: p.response_ids for p, s in zip(prompts, scored)}
        pairs, stats = build_spin_pairs(scored, truth, per_prompt=cfg.spin_selection)
    else:
        pairs, stats = build_pairs(scored, strategy=cfg.strategy, margin=cfg.min_margin,
                                   unfinished_penalty=cfg.unfinished_penalty, ties=cfg.ties)
    return pairs, stats


def step_metrics(scored: Sequence[Sequence[ScoredSample]], stats: PairStats, update: dict, timing: dict, *,
                 iteration: int, version: int) -> dict:
    rewards = [s.reward for g in scored for s in g]
    tokens = sum(len(s.response_ids) for g in scored for s in g)
    return {**update, **stats.as_metrics(),
            "reward/mean": sum(rewards) / len(rewards), "reward/max": max(rewards), "reward/min": min(rewards),
            "spin_iteration": iteration, "weight_version": version,
            "rollout/tokens_per_s": tokens / max(timing["generate"], 1e-9),
            **{f"timing/{k}": v for k, v in timing.items()}}
