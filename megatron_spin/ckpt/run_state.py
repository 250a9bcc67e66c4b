"""Run checkpoints: what a resumed run needs to continue exactly where it stopped.

    <run_dir>/checkpoints/step_00000004/
        actor/          Megatron dist checkpoint of the actor (layout-free: loads at any TP/PP),
                        with megatron_spin.json and hf/: exports (convert_megatron_to_hf.py) and
                        serves (megatron-spin-serve) on its own
        reference/      the reference model's weights (absent for reference-free losses)
        optimizer/      one file per rank: optimizer and LR-schedule state, RNG state
        trainer_state.json   step, weight version, SPIN iteration, data position, evaluations
    <run_dir>/checkpoints/latest      the name of the newest complete checkpoint

A checkpoint is written into a hidden sibling (``.step_00000004.tmp``) by every rank, completed
with ``trainer_state.json`` by the driver, fsynced and renamed into place; ``latest`` is
rewritten (temporary file + rename) only after that.  A crash at any point leaves either the
previous checkpoint as ``latest`` or the new one, never a half-written one.

The optimizer state is per rank, so a run resumes at the layout it was saved with (the
weights themselves reshard freely); the trainer state records the layout and refuses another.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_spin.ckpt.atomic import publish_dir

STATE_FILE = "trainer_state.json"
ACTOR_SUBDIR = "actor"  # the actor's weights, with the model's identity: exports and serves on its own


def checkpoints_root(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def staging_dir(run_dir: str | os.PathLike, step: int) -> Path:
    """Where the ranks write step ``step``'s checkpoint before it is published (cleared first)."""
    tmp = checkpoints_root(run_dir) / f".step_{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # leftovers of a crashed save
    tmp.mkdir(parents=True)
    return tmp


def publish(run_dir: str | os.PathLike, step: int, staged: Path, state: dict, keep: int = 2) -> Path:
    """Complete a staged checkpoint with the trainer state, rename it into place, update ``latest``."""
    (staged / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=2))
    root = checkpoints_root(run_dir)
    final = root / f"step_{step:08d}"
    publish_dir(staged, final, replace=True)
    tmp = root / ".latest.tmp"
    tmp.write_text(final.name + "\n")
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, root / "latest")
    if keep > 0:  # the newest ``keep`` stay; older ones go only after the new one is in place
        older = sorted(p for p in root.glob("step_*") if p != final)
        for old in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest(run_dir: str | os.PathLike) -> Optional[Path]:
    pointer = checkpoints_root(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = checkpoints_root(run_dir) / pointer.read_text().strip()
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{pointer} names {path}, which is not a complete checkpoint")
    return path


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Optional[Path]:
    """``auto``: the run directory's latest checkpoint if any; ``disable``: none; else a path."""
    if resume == "disable":
        return None
    if resume == "auto":
        return latest(run_dir)
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"trainer.resume={resume}: not a checkpoint directory (no {STATE_FILE})")
    return path


def read_state(path: Path) -> dict:
    return json.loads((path / STATE_FILE).read_text())
