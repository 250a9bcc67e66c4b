"""The pieces of an online step that ``main.py``'s loop names: pairs, evaluation, checkpoints, metrics.

Kept here so the loop itself reads as the data flow; each helper is one stage of it.
"""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Optional, Sequence

from megatron_spin.ckpt import run_state
from megatron_spin.config.run import AlgorithmConfig
from megatron_spin.pairs import PairStats, PreferencePair, ScoredSample, build_pairs, build_spin_pairs
from megatron_spin.rollout.protocol import SamplingParams
from megatron_spin.rollout.scoring import score_completions


def make_pairs(algo: AlgorithmConfig, prompts, scored: Sequence[Sequence[ScoredSample]],
               multiple: int) -> tuple[list[PreferencePair], PairStats, int]:
    """Pairs for one update (best-vs-worst / all pairs above a margin, or SPIN's ground truth vs
    sample), cut to a multiple of DP × micro-batch so every rank gets whole micro-batches;
    returns the pairs, the builder's counts and how many were cut."""
    if algo.spin:
        truth = {s[0].prompt_id: p.response_ids for p, s in zip(prompts, scored)}
        pairs, stats = build_spin_pairs(scored, truth, per_prompt=algo.spin_selection)
    else:
        pairs, stats = build_pairs(scored, strategy=algo.pair_strategy, margin=algo.min_margin,
                                   unfinished_penalty=algo.unfinished_penalty)
    cut = len(pairs) % multiple
    return pairs[: len(pairs) - cut], stats, cut


class Evaluator:
    """Greedy answers to the held-out prompts, scored by the run's reward; mean per step."""

    def __init__(self, parts, max_new_tokens: int):
        self.parts, self.results = parts, {}
        self.sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
        if not parts.val:
            print("[data] no held-out prompts (data.val_files): held-out evaluation is off", flush=True)

    def __call__(self, step: int) -> Optional[float]:
        p = self.parts
        if not p.val:
            return None
        groups = p.cluster.fleet.generate([x.input_ids for x in p.val], self.sampling)
        scored = score_completions(p.val, groups, p.tokenizer, p.reward, "val:")
        self.results[step] = sum(s[0].reward for s in scored) / len(scored)
        p.logger.log(step, {"reward/mean": self.results[step], "prompts": len(scored)}, kind="eval")
        return self.results[step]


def step_metrics(scored, stats: PairStats, update: dict, timing: dict, *, cut: int, iteration: int,
                 version: int) -> dict:
    rewards = [s.reward for g in scored for s in g]
    tokens = sum(len(s.response_ids) for g in scored for s in g)
    return {**update, **stats.as_metrics(), "pairs/cut_to_micro_batches": cut,
            "reward/mean": sum(rewards) / len(rewards), "reward/max": max(rewards), "reward/min": min(rewards),
            "spin_iteration": iteration, "weight_version": version,
            "rollout/tokens_per_s": tokens / max(timing["generate"], 1e-9),
            **{f"timing/{k}": v for k, v in timing.items()}}


class StopRequest:
    """Set by SIGUSR1 (Slurm's ``--signal=B:USR1@T`` reaches the driver through the launcher):
    the loop saves a checkpoint after the step under way and stops, so a time limit costs no work."""

    _installed: Optional["StopRequest"] = None

    def __init__(self):
        self.requested: Optional[str] = None

    @classmethod
    def install(cls) -> "StopRequest":
        """The process's one request object; the handler is installed once, as early as possible
        (SIGUSR1's default action would kill the driver)."""
        if cls._installed is None:
            cls._installed = cls()
            if threading.current_thread() is threading.main_thread():  # signal handlers live there only
                signal.signal(signal.SIGUSR1, lambda *_: setattr(cls._installed, "requested", "SIGUSR1"))
        return cls._installed


def save_checkpoint(cluster, run_dir: Path, step: int, state: dict) -> float:
    """Every rank writes its part into a staging directory; published atomically; returns seconds."""
    started = time.monotonic()
    staged = run_state.staging_dir(run_dir, step)
    cluster.call("save_checkpoint", str(staged), what=f"checkpoint {step}")
    run_state.publish(run_dir, step, staged, state)
    return time.monotonic() - started


def resume(cluster, loader, path: Path) -> dict:
    """Load weights, optimizer, reference and data position; give the engines the weights."""
    state = run_state.read_state(path)
    cluster.call("load_checkpoint", str(path), what=f"resume from {path}")
    loader.load_state_dict(state["data"])
    cluster.push(state["weight_version"])
    return state
