"""The Slurm launcher on a real Slurm: two simulated nodes, a Ray head and a Ray worker, one run.

A local Slurm (munge, slurmctld, ``slurmd -N n1`` and ``-N n2``; see tests/slurm_local.py) gets
``sbatch --nodes=2 slurm/launch.sh --preset spin_trainer ...`` with a tiny model on the CPU and
a TP=2 actor, whose two ranks the placement puts on different nodes.  The test polls the queue
until the job ends and checks that it completed, that both nodes' ranks wrote their metrics,
that the driver's metrics and the report are there, and that no Ray process of the job is left.
Slurm is installed with apt when missing; the test skips only where the OS cannot provide it.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from megatron_spin.parallel.launch import free_port
from tests.e2e.test_online import write_prompts
from tests.slurm_local import LocalSlurm, ensure_slurm

pytestmark = [pytest.mark.timeout(900)]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = ensure_slurm()
    if reason:
        pytest.skip(reason)
    with LocalSlurm(tmp_path_factory.mktemp("slurm"), nodes=("n1", "n2"), cpus=2) as cluster:
        yield cluster


def _ray_processes(port: int) -> list[str]:
    out = subprocess.run(["pgrep", "-af", f"port={port}|:{port}"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "ray" in line and "pgrep" not in line]


def test_launcher_runs_across_two_nodes(slurm, tiny_chat_model, spin_cache, tmp_path):
    train = write_prompts(tmp_path / "train.jsonl", 8)
    val = write_prompts(tmp_path / "val.jsonl", 2)
    run_dir, port = tmp_path / "run", free_port()
    home = tmp_path / "home"  # a fresh home: no Ray token from earlier runs, nothing written to the real one
    home.mkdir()
    env = {"HOME": str(home), "MEGATRON_SPIN_CACHE": str(spin_cache), "PYTHONPATH": str(REPO),
           "SPIN_PYTHON": os.path.join(REPO, ".venv", "bin", "python")}
    job = slurm.sbatch([
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
        "slurm/launch.sh", "--preset", "spin_trainer", "--run-dir", str(run_dir), "--ray-port", str(port),
        "--nodes-timeout", "180",
        f"actor_rollout_ref.model.path={tiny_chat_model}", "actor_rollout_ref.actor.tp=2",
        f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.train_batch_size=4",
        "data.max_response_length=8", "actor_rollout_ref.rollout.n=3", "actor_rollout_ref.actor.micro_pairs=1",
        "reward_model.type=function", "reward_model.function=tests.e2e.test_online:length_reward",
        "trainer.total_training_steps=2", "trainer.test_freq=0", "trainer.timeout_s=600",
    ], cwd=REPO, env=env)
    state = slurm.wait(job, timeout=720)
    out = (tmp_path / "job.out").read_text(errors="replace") if (tmp_path / "job.out").exists() else ""
    logs = "\n".join(f"--- {f.name}\n{f.read_text(errors='replace')[-2000:]}"
                     for f in sorted((run_dir / "logs").glob("*.log"))) if (run_dir / "logs").exists() else ""
    assert state == "COMPLETED", f"job {job} ended {state}\n{out[-4000:]}\n{logs}\n{slurm.logs()}"

    # The cluster had both nodes, each with its own Ray log.
    assert "2/2 nodes up" in out, out[-3000:]
    assert (run_dir / "logs" / "ray-head-n1.log").exists() and (run_dir / "logs" / "ray-worker-n2.log").exists()
    assert "[train step 2]" in (run_dir / "logs" / "driver.log").read_text()

    # Each trainer rank wrote its own timings, from its own node.
    ranks = {}
    for f in sorted((run_dir / "ranks").glob("rank_*.jsonl")):
        recs = [json.loads(line) for line in f.read_text().splitlines()]
        ranks[f.name] = recs
    assert sorted(ranks) == ["rank_00000.jsonl", "rank_00001.jsonl"]
    nodes = {recs[0]["node"] for recs in ranks.values()}
    ray_nodes = {recs[0]["ray_node_id"] for recs in ranks.values()}
    assert nodes == {"n1", "n2"} and len(ray_nodes) == 2, [recs[0] for recs in ranks.values()]
    for recs in ranks.values():
        train = [r for r in recs if r["kind"] == "train"]
        assert [r["step"] for r in train] == [1, 2] and all(r["timing/train"] > 0 and r["tokens"] > 0 for r in train)
        assert [r["step"] for r in recs if r["kind"] == "sync"] == [1, 2]

    # The driver's metrics (with throughput and MFU) and the report the launcher wrote at the end.
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [m for m in metrics if m["kind"] == "train"]
    assert [m["step"] for m in train] == [1, 2]
    assert all(m["perf/devices"] == 2 and 0 < m["perf/mfu"] < 1 for m in train), train
    assert (run_dir / "report.md").exists(), out[-2000:]

    # Teardown: the job's Ray head and worker are gone.
    assert _ray_processes(port) == []


def _submit(slurm, tmp_path, tiny_model, cache, run_dir, port, *overrides, job_name=None):
    """``run_dir=None``: the launcher's default, <repo>/runs/spin_trainer/<job name>; ``cache``: the
    session's (the tiny model converted once, not once per job)."""
    train = write_prompts(tmp_path / "train.jsonl", 8)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = {"HOME": str(home), "MEGATRON_SPIN_CACHE": str(cache), "PYTHONPATH": str(REPO),
           "SPIN_PYTHON": os.path.join(REPO, ".venv", "bin", "python")}
    return slurm.sbatch([
        "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=2", f"--output={tmp_path}/job.out",
        *([f"--job-name={job_name}"] if job_name else []),
        "slurm/launch.sh", "--preset", "spin_trainer", *(["--run-dir", str(run_dir)] if run_dir else []),
        "--ray-port", str(port),
        "--nodes-timeout", "180", f"actor_rollout_ref.model.path={tiny_model}", "actor_rollout_ref.actor.tp=2",
        f"data.train_files=[{train}]", "data.val_size=0", "data.train_batch_size=4", "data.max_response_length=8",
        "actor_rollout_ref.rollout.n=3", "actor_rollout_ref.actor.micro_pairs=1", "reward_model.type=function",
        "reward_model.function=tests.e2e.test_online:length_reward", "trainer.test_freq=0", *overrides,
    ], cwd=REPO, env=env)


def _gone(port: int, seconds: float = 30.0) -> list[str]:
    import time

    deadline = time.monotonic() + seconds
    while (left := _ray_processes(port)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


def _wait_for_training(slurm, job, run_dir, tmp_path, seconds=400):
    import time

    deadline = time.monotonic() + seconds
    metrics = run_dir / "metrics.jsonl"
    while not metrics.exists() or '"kind": "train"' not in metrics.read_text():
        assert slurm.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), (tmp_path / "job.out").read_text()
        assert time.monotonic() < deadline, "training never started"
        time.sleep(0.5)


@pytest.fixture
def default_run_dir(tmp_path):
    """The launcher's default run directory for a unique job name (removed afterwards)."""
    import shutil

    name = f"test-usr1-{tmp_path.name}-{os.getpid()}"
    yield name, REPO / "runs" / "spin_trainer" / name
    shutil.rmtree(REPO / "runs" / "spin_trainer" / name, ignore_errors=True)


def test_usr1_saves_a_checkpoint_and_a_resubmission_resumes(slurm, tiny_chat_model, spin_cache, tmp_path,
                                                            default_run_dir):
    # No --run-dir: the default (runs/<preset>/<job name>) must be the same for the resubmission.
    name, run_dir = default_run_dir
    port = free_port()
    job = _submit(slurm, tmp_path, tiny_chat_model, spin_cache, None, port, "trainer.total_training_steps=500",
                  job_name=name)
    _wait_for_training(slurm, job, run_dir, tmp_path)
    # What `#SBATCH --signal=B:USR1@900` does before the time limit.
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], env=slurm.env, check=True)
    state = slurm.wait(job, timeout=300)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert state == "COMPLETED", f"{state}\n{out[-3000:]}"
    from megatron_spin.ckpt import run_state

    saved = run_state.latest(run_dir)
    stopped = run_state.read_state(saved)["step"] if saved is not None else None
    assert "[stop] SIGUSR1: checkpoint at step" in out and stopped is not None and 1 <= stopped < 500, out[-3000:]
    assert _gone(port) == []

    # The same command, now for one more step: it resumes from the checkpoint the signal left.
    job = _submit(slurm, tmp_path, tiny_chat_model, spin_cache, None, free_port(),
                  f"trainer.total_training_steps={stopped + 1}",
                  job_name=name)
    state = slurm.wait(job, timeout=400)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert state == "COMPLETED", f"{state}\n{out[-3000:]}"
    assert "[resume] from" in out and f"at step {stopped}" in out, out[-3000:]
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, stopped + 2))  # every step once, none lost, none repeated


def test_scancel_tears_the_job_down(slurm, tiny_chat_model, spin_cache, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    job = _submit(slurm, tmp_path, tiny_chat_model, spin_cache, run_dir, port, "trainer.total_training_steps=500")
    _wait_for_training(slurm, job, run_dir, tmp_path)
    assert _ray_processes(port), "the job's Ray cluster should be up while it trains"
    subprocess.run(["scancel", job], env=slurm.env, check=True)
    state = slurm.wait(job, timeout=120)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert state == "CANCELLED", f"{state}\n{out[-3000:]}"
    assert "terminated (scancel or time limit)" in out and "teardown done" in out, out[-3000:]
    assert _gone(port) == []


def test_a_failing_trainer_fails_the_job_and_still_tears_down(slurm, tiny_chat_model, spin_cache, tmp_path):
    run_dir, port = tmp_path / "run", free_port()
    # A layout the model cannot take: refused at start-up, after the Ray cluster came up.
    job = _submit(slurm, tmp_path, tiny_chat_model, spin_cache, run_dir, port, "trainer.total_training_steps=2",
                  "actor_rollout_ref.actor.pp=4")
    state = slurm.wait(job, timeout=400)
    out = (tmp_path / "job.out").read_text(errors="replace")
    assert state == "FAILED", f"{state}\n{out[-3000:]}"
    assert "2/2 nodes up" in out and "the trainer failed" in out, out[-3000:]
    driver = (run_dir / "logs" / "driver.log").read_text()
    assert "config error: actor_rollout_ref.actor: tp=2, pp=4, vpp=None" in driver, driver[-2000:]
    assert "rule num_layers % PP == 0 violated" in driver
    assert _gone(port) == []
