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

from tests.e2e.test_online import tiny_chat_model, write_prompts  # noqa: F401  (fixture)
from tests.slurm_local import LocalSlurm, _free_ports, ensure_slurm

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


def test_launcher_runs_across_two_nodes(slurm, tiny_chat_model, tmp_path):  # noqa: F811
    train = write_prompts(tmp_path / "train.jsonl", 8)
    val = write_prompts(tmp_path / "val.jsonl", 2)
    run_dir, port = tmp_path / "run", _free_ports(1)[0]
    home = tmp_path / "home"  # a fresh home: no Ray token from earlier runs, nothing written to the real one
    home.mkdir()
    env = {"HOME": str(home), "MEGATRON_SPIN_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO),
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
