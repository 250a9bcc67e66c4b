"""Save and resume a run: every rank's part into a staging directory, published atomically."""

from __future__ import annotations

import time
from pathlib import Path

from megatron_spin.ckpt import run_state
from megatron_spin.data.prompts import PromptLoader
from megatron_spin.driver.state import RunState
from megatron_spin.orchestrate.cluster import TrainerCluster


def save_checkpoint(cluster: TrainerCluster, run_dir: Path, state: RunState) -> float:
    """Weights, optimizer, reference and ``state``; ``latest`` names it only once complete.
    Returns the seconds it took."""
    started = time.monotonic()
    staged = run_state.staging_dir(run_dir, state.step)
    cluster.save_checkpoint(staged, state.step)
    run_state.publish(run_dir, state.step, staged, state.to_json())
    return time.monotonic() - started


def resume(cluster: TrainerCluster, loader: PromptLoader, path: Path, state: RunState) -> None:
    """Load weights, optimizer, reference and data position; give the engines the weights."""
    cluster.load_checkpoint(path)
    loader.load_state_dict(state.data)
    cluster.push(state.weight_version)
    print(f"[resume] from {path} at step {state.step}", flush=True)
