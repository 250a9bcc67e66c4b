"""Faults a run must end cleanly from: a trainer rank killed inside a checkpoint write.

The kill is real (SIGKILL of a real rank process, from a helper Megatron's checkpoint writer
forked); what triggers it is the fault injection in ``tests/e2e/faults/sitecustomize.py``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from megatron_spin.ckpt import run_state
from tests.e2e.test_online import write_prompts

pytestmark = [pytest.mark.timeout(600)]

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60


def processes_of(marker: str) -> list[str]:
    """Every live process whose environment carries ``marker`` (orphans reparented to init too)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if marker.encode() in Path(f"/proc/{pid}/environ").read_bytes():
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")[:120]
                found.append(f"{pid} {cmdline!r}")
        except OSError:  # gone meanwhile, or not ours to read
            pass
    return found


def test_a_rank_killed_inside_a_checkpoint_write_ends_the_run_within_its_timeout(tiny_chat_model, spin_cache, tmp_path):
    train, run_dir, marker = write_prompts(tmp_path / "train.jsonl", 12), tmp_path / "run", uuid.uuid4().hex
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'tests' / 'e2e' / 'faults'}{os.pathsep}{REPO}",
           "MEGATRON_SPIN_CACHE": str(spin_cache), "SPIN_TEST_FAULT": "kill_rank_from_checkpoint_writer",
           "SPIN_TEST_RUN": marker}
    cmd = [sys.executable, "-m", "megatron_spin.main", f"actor_rollout_ref.model.path={tiny_chat_model}",
           f"data.train_files=[{train}]", "data.val_files=[]", "data.train_batch_size=4", "data.max_response_length=8",
           "actor_rollout_ref.rollout.n=3", "actor_rollout_ref.actor.micro_pairs=1", "trainer.cpu_ranks=2",
           "reward_model.type=function", "reward_model.function=tests.e2e.test_online:length_reward",
           "trainer.total_training_steps=3", "trainer.save_freq=1", f"trainer.timeout_s={TIMEOUT_S}",
           f"trainer.default_local_dir={run_dir}"]
    started = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=400, cwd=tmp_path, env=env)
    elapsed = time.monotonic() - started
    assert done.returncode == 1, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("run failed: checkpoint 2 failed: a trainer rank or engine process died"), \
        done.stderr[-3000:]
    # Start-up takes ~30 s here; the failure and the teardown must fit in the timeout after it.
    assert elapsed < 30 + 2 * TIMEOUT_S, f"{elapsed:.0f} s"
    deadline = time.monotonic() + 15  # Ray reaps its processes asynchronously after the driver exits
    while processes_of(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of(marker) == []  # no rank, no writer helper, no engine, no Ray process left
    latest = run_state.latest(run_dir)  # the interrupted checkpoint never became `latest`
    assert latest is not None and latest.name == "step_00000001" and run_state.read_state(latest)["step"] == 1
