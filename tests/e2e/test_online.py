"""The online loop from the command line: Ray-placed TP=2 actor, embedded engine, rule reward, SPIN.

A tiny random Llama that uses SmolLM2's tokenizer (so prompts go through a real chat
template) keeps each step to seconds.  Both runs go through ``python -m megatron_spin.main``
with Hydra overrides, as a user would run them.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from megatron_spin.parallel.launch import free_port

pytestmark = [pytest.mark.timeout(900)]


def length_reward(prompt, response, reference):
    """A rule reward that separates random samples: longer responses score higher."""
    return float(len(response.split()))


_scored = [0]


def length_reward_killing_the_engine(prompt, response, reference):
    """``length_reward``, and at the first sample of step 2 (after the held-out evaluation's 2
    samples and step 1's 12) a SIGKILL of this run's rollout engine — a real engine death, the
    fault injected from here (named as such): the engine process carries the test's marker."""
    _scored[0] += 1
    if _scored[0] == 2 + 12 + 1:
        marker = os.environ["SPIN_TEST_RUN"].encode()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmdline, environ = (Path(f"/proc/{pid}/{f}").read_bytes() for f in ("cmdline", "environ"))
            except OSError:
                continue
            if b"megatron_spin.rollout.embedded" in cmdline and marker in environ:
                os.kill(int(pid), signal.SIGKILL)
    return length_reward(prompt, response, reference)


def write_prompts(path, n, with_truth=False):
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"Tell me something about the number {i}.", "topic": i}
            if with_truth:
                row["response"] = f"The number {i} is {'even' if i % 2 == 0 else 'odd'}."
            f.write(json.dumps(row) + "\n")
    return path


def run_cli(tmp_path, *overrides, cache, env=None):
    """``python -m megatron_spin.main`` in ``tmp_path`` with ``cache`` as its cache (the session's:
    the tiny model is converted by the first run that needs it and reused by the others)."""
    cmd = [sys.executable, "-m", "megatron_spin.main", *overrides]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=800, cwd=tmp_path,
                          env={**__import__("os").environ, "MEGATRON_SPIN_CACHE": str(cache),
                               "PYTHONPATH": str(__import__("pathlib").Path(__file__).resolve().parents[2]),
                               **(env or {})})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    return done


RAY_STARTED = "Started a local Ray instance"  # what ray.init logs when the driver starts one


def records(run_dir, kind):
    return [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_online_dpo_tp2_from_the_command_line(tiny_chat_model, spin_cache, tmp_path):
    train = write_prompts(tmp_path / "train.jsonl", 12)
    val = write_prompts(tmp_path / "val.jsonl", 3)
    run_dir = tmp_path / "run"
    done = run_cli(tmp_path, f"actor_rollout_ref.model.path={tiny_chat_model}", "actor_rollout_ref.actor.tp=2",
                   f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.train_batch_size=4",
                   "data.max_response_length=12", "actor_rollout_ref.rollout.n=3",
                   "actor_rollout_ref.actor.micro_pairs=1", "reward_model.type=function",
                   "reward_model.function=tests.e2e.test_online:length_reward", "trainer.total_training_steps=2",
                   "trainer.ref_update_freq=1", "trainer.test_freq=1", "trainer.logger=[console,jsonl,tensorboard]",
                   f"trainer.default_local_dir={run_dir}", "actor_rollout_ref.actor.optim.lr=1e-4", cache=spin_cache)
    assert "[train step 2]" in done.stdout
    train_steps = records(run_dir, "train")
    assert [r["step"] for r in train_steps] == [1, 2]
    for r in train_steps:
        assert r["pairs/kept"] >= 1 and math.isfinite(r["loss"]) and r["sync/engines"] == 1
        assert r["weight_version"] == r["step"] and r["sync/gbytes"] > 0
    assert [r["spin_iteration"] for r in train_steps] == [1, 2]  # the reference was refreshed each step
    assert [r["step"] for r in records(run_dir, "eval")] == [0, 1, 2]
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["actor_rollout_ref"]["actor"]["tp"] == 2
    assert (run_dir / "logs" / "engine-0.log").exists() and list((run_dir / "tensorboard").iterdir())
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["eval_reward"]) == {"0", "1", "2"}
    report = (run_dir / "report.md").read_text()
    assert "## Held-out reward" in report and "| 2 |" in report and "![reward and loss](reward_loss.png)" in report
    assert (run_dir / "reward_loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "held-out reward" in done.stdout


def test_spin_from_the_command_line(tiny_chat_model, spin_cache, tmp_path):
    train = write_prompts(tmp_path / "train.jsonl", 8, with_truth=True)
    run_dir = tmp_path / "spin"
    run_cli(tmp_path, f"actor_rollout_ref.model.path={tiny_chat_model}", f"data.train_files=[{train}]",
            f"data.val_files=[{train}]", "data.val_size=2", "data.train_batch_size=4", "data.max_response_length=16",
            "algorithm.spin=true", "actor_rollout_ref.rollout.n=1", "actor_rollout_ref.actor.micro_pairs=2",
            "reward_model.type=function", "reward_model.function=tests.e2e.test_online:length_reward",
            "trainer.total_training_steps=2", f"trainer.default_local_dir={run_dir}", cache=spin_cache)
    steps = records(run_dir, "train")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # ground truth vs the policy's own sample: one pair per prompt
        assert r["pairs/kept"] == 4 and math.isfinite(r["loss"]) and r["weight_version"] == r["step"]


def checkpoint_tensors(path):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = path.parent / f"{path.name}.pt"
    dcp_to_torch_save(str(path), str(out))
    return torch.load(out, weights_only=False)


EXACT_KEYS = ("loss", "grad_norm", "logps_chosen", "logps_rejected", "reward/mean", "pairs/kept", "reward_margin", "lr")


@pytest.fixture(scope="module")
def resume_runs(tiny_chat_model, spin_cache, tmp_path_factory):
    """Four steps straight through, and the same four stopped after step 2 and resumed: (straight, resumed,
    the resuming run's output, (its working directory, its overrides)).  Module-scoped: the report test reads the same two runs (no extra trainer run)."""
    tmp_path = tmp_path_factory.mktemp("resume")
    train = write_prompts(tmp_path / "train.jsonl", 10)
    common = [f"actor_rollout_ref.model.path={tiny_chat_model}", "actor_rollout_ref.actor.tp=2",
              f"data.train_files=[{train}]", f"data.val_files=[{train}]", "data.val_size=2",
              "data.train_batch_size=4", "data.max_response_length=10", "actor_rollout_ref.rollout.n=3",
              "reward_model.type=function", "reward_model.function=tests.e2e.test_online:length_reward",
              "actor_rollout_ref.actor.optim.lr=1e-3", "trainer.ref_update_freq=3", "trainer.save_freq=2",
              "actor_rollout_ref.actor.micro_pairs=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for steps, run_dir in ((4, straight), (2, resumed)):
        run_cli(tmp_path, *common, f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run_dir}",
                cache=spin_cache)
    assert (resumed / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    done = run_cli(tmp_path, *common, "trainer.total_training_steps=4", f"trainer.default_local_dir={resumed}",
                   cache=spin_cache)
    return straight, resumed, done, (tmp_path, common)


def assert_same_run(straight, resumed, done) -> list[dict]:
    """The resumed run (2 + 2 steps) equals the straight one (4 steps): every exact metric of
    every step and every weight of the final checkpoint.  Returns the straight run's records."""
    assert "[resume] from" in done.stdout and "at step 2" in done.stdout
    a, b = records(straight, "train"), records(resumed, "train")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in EXACT_KEYS} == {k: rb[k] for k in EXACT_KEYS}, ra["step"]
        assert ra["spin_iteration"] == rb["spin_iteration"]
    final_a = checkpoint_tensors(straight / "checkpoints" / "step_00000004" / "actor")
    final_b = checkpoint_tensors(resumed / "checkpoints" / "step_00000004" / "actor")
    assert final_a.keys() == final_b.keys()
    for k in final_a:
        if isinstance(final_a[k], torch.Tensor):
            assert torch.equal(final_a[k], final_b[k]), k
    return a


def test_a_killed_engine_is_restarted_and_the_run_equals_an_uninterrupted_one(resume_runs, spin_cache):
    """kill -9 of the only engine during step 2: the push after the update finds it gone, starts
    it again on its address, pushes the actor's weights and re-admits it; steps 3 and 4 sample
    from it.  Sampling is seeded, so every metric and the final weights equal the straight run's."""
    straight, _, _, (tmp_path, common) = resume_runs
    killed = tmp_path / "killed"
    overrides = [o for o in common if not o.startswith("reward_model.function=")]
    done = run_cli(tmp_path, *overrides, "reward_model.function=tests.e2e.test_online:length_reward_killing_the_engine",
                   "trainer.total_training_steps=4", f"trainer.default_local_dir={killed}",
                   cache=spin_cache, env={"SPIN_TEST_RUN": uuid.uuid4().hex})
    assert "engine 0 has exited: restarting it (1/3)" in done.stdout + done.stderr, done.stderr[-3000:]
    a, b = records(straight, "train"), records(killed, "train")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert {k: ra[k] for k in EXACT_KEYS} == {k: rb[k] for k in EXACT_KEYS}, ra["step"]
    final_a = checkpoint_tensors(straight / "checkpoints" / "step_00000004" / "actor")
    final_b = checkpoint_tensors(killed / "checkpoints" / "step_00000004" / "actor")
    for k in final_a:
        if isinstance(final_a[k], torch.Tensor):
            assert torch.equal(final_a[k], final_b[k]), k


def test_resume_continues_exactly(resume_runs):
    straight, resumed, done, _ = resume_runs
    a = assert_same_run(straight, resumed, done)
    assert a[1]["loss"] != a[0]["loss"] and a[2]["loss"] != a[0]["loss"]  # updates happened between steps
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["latest", "step_00000002", "step_00000004"]


def test_a_finished_run_started_again_evaluates_its_final_weights(resume_runs, spin_cache):
    """The final checkpoint is written before the final evaluation, so a crash during that
    evaluation leaves a run at its last step unevaluated: started again, it loads the checkpoint,
    trains nothing and evaluates — the same held-out reward as the straight run's last."""
    straight, resumed, _, (tmp_path, common) = resume_runs
    again = tmp_path / "again"
    shutil.copytree(resumed, again)
    summary = json.loads((again / "summary.json").read_text())
    (again / "summary.json").unlink()
    evals_at_4 = sum(r["step"] == 4 for r in records(again, "eval"))
    done = run_cli(tmp_path, *common, "trainer.total_training_steps=4", f"trainer.default_local_dir={again}",
                   cache=spin_cache)
    assert "at step 4" in done.stdout
    assert [r["step"] for r in records(again, "train")] == [1, 2, 3, 4]  # nothing trained again
    final = json.loads((again / "summary.json").read_text())
    expected = json.loads((straight / "summary.json").read_text())["eval_reward"]["4"]
    assert final["steps"] == 4 and final["eval_reward"]["4"] == expected == summary["eval_reward"]["4"]
    assert sum(r["step"] == 4 for r in records(again, "eval")) == evals_at_4 + 1


def test_resume_dp2_with_the_distributed_optimizer_continues_exactly(tiny_chat_model, spin_cache, tmp_path):
    """Two data-parallel CPU ranks (trainer.cpu_ranks=2), the distributed optimizer (its state
    sharded over DP, saved through its sharded state dict) and a warmup + cosine schedule: 2 steps,
    stop, resume, 2 more equal 4 straight — metrics and every weight, bit for bit."""
    train = write_prompts(tmp_path / "train.jsonl", 10)
    common = [f"actor_rollout_ref.model.path={tiny_chat_model}", "trainer.cpu_ranks=2",
              "actor_rollout_ref.actor.optim.use_distributed_optimizer=true", f"data.train_files=[{train}]",
              f"data.val_files=[{train}]", "data.val_size=2", "data.train_batch_size=4",
              "data.max_response_length=10", "actor_rollout_ref.rollout.n=3", "reward_model.type=function",
              "reward_model.function=tests.e2e.test_online:length_reward", "actor_rollout_ref.actor.optim.lr=1e-3",
              "actor_rollout_ref.actor.optim.lr_warmup_steps=2", "actor_rollout_ref.actor.optim.lr_decay_steps=6",
              "actor_rollout_ref.actor.optim.lr_decay_style=cosine", "trainer.save_freq=2",
              "actor_rollout_ref.actor.micro_pairs=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for steps, run_dir in ((4, straight), (2, resumed)):
        run_cli(tmp_path, *common, f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run_dir}",
                cache=spin_cache)
    done = run_cli(tmp_path, *common, "trainer.total_training_steps=4", f"trainer.default_local_dir={resumed}",
                   cache=spin_cache)
    a = assert_same_run(straight, resumed, done)
    lrs = [r["lr"] for r in a]  # warmup, peak, cosine: a resume one schedule step off would show
    assert all(x != y for x, y in zip(lrs, lrs[1:])), lrs
    ranks = {json.loads(line)["dp"] for f in (straight / "ranks").iterdir() for line in f.read_text().splitlines()}
    assert ranks == {0, 1}  # two data-parallel ranks trained


def test_report_over_two_runs_renders(resume_runs, tmp_path):
    """``tools/report.py`` on the straight and the resumed run: both named, means filled in, every figure renders."""
    import matplotlib.image as mpimg

    straight, resumed, *_ = resume_runs
    out = tmp_path / "report"
    tool = Path(__file__).resolve().parents[2] / "tools" / "report.py"
    done = subprocess.run([sys.executable, str(tool), str(straight), str(resumed), "--out", str(out),
                           "--title", "straight vs resumed"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"read {straight}: 4 train steps" in done.stdout and f"read {resumed}: 4 train steps" in done.stdout
    report = (out / "report.md").read_text()
    assert report.startswith("# straight vs resumed")
    time_rows = [line for line in report.split("## Time per step")[1].splitlines() if line.startswith("| `")]
    generate = sum(r["timing/generate"] for r in records(straight, "train")) / 4
    assert time_rows[0].startswith(f"| `straight` | {generate:.2f} |") and time_rows[1].startswith("| `resumed` | ")
    assert "- `straight`: **" in report and "- `resumed`: **" in report  # held-out before → after, each run
    figures = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {"step_time.png", "throughput.png", "mfu.png", "sync.png", "reward_loss.png", "ranks.png"} <= set(figures)
    for name in figures:
        img = mpimg.imread(out / name)
        assert img.ndim == 3 and img.shape[0] >= 200 and img.shape[1] >= 300, (name, img.shape)
        assert img[..., :3].std() > 0.01, f"{name} is blank"
    for run in (straight, resumed):  # every trainer rank wrote its timings; the report names the slowest
        section = report.split(f"### `{run.name}`")[1]
        assert sorted(p.name for p in (run / "ranks").iterdir()) == ["rank_00000.jsonl", "rank_00001.jsonl"]
        assert "Slowest rank" in section, section[:1500]


def test_joins_an_existing_ray_cluster(tiny_chat_model, spin_cache, tmp_path):
    """``trainer.ray_address`` joins a running cluster (here a head started with ``ray start``)."""
    import os
    import shutil
    import signal
    import socket
    import tempfile
    import time

    ray_bin = shutil.which("ray", path=os.path.dirname(sys.executable))
    port = free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must stay under 107 bytes
    # A test-only head on loopback, token auth off on both sides; in its own process group, so
    # that stopping it (killing the group) touches no other Ray on the machine (`ray stop` would).
    ray_env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([ray_bin, "start", "--head", "--block", f"--port={port}", "--num-cpus=4",
                             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ray_env, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            assert head.poll() is None, "ray start exited"
            time.sleep(0.5)
        train = write_prompts(tmp_path / "train.jsonl", 4)
        run_dir = tmp_path / "joined"
        done = run_cli(tmp_path, f"actor_rollout_ref.model.path={tiny_chat_model}", f"data.train_files=[{train}]",
                       f"data.val_files=[{train}]", "data.val_size=1", "data.train_batch_size=2",
                       "data.max_response_length=8", "actor_rollout_ref.rollout.n=2", "actor_rollout_ref.actor.micro_pairs=1",
                       "reward_model.type=function", "reward_model.function=tests.e2e.test_online:length_reward",
                       "trainer.total_training_steps=1", f"trainer.ray_address=127.0.0.1:{port}",
                       f"trainer.default_local_dir={run_dir}", cache=spin_cache,
                       env={"RAY_AUTH_MODE": "disabled"})
        assert "Connected to Ray cluster" in done.stdout + done.stderr
        assert [r["step"] for r in records(run_dir, "train")] == [1]
    finally:
        # SIGTERM to `ray start --block` alone: it stops its node's processes itself (~2 s).  The
        # same signal to the whole group stops the GCS first, and the head then waits out Ray's
        # 30 s SIGTERM drain (RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S) for a GCS that is gone.
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever of the group is left (nothing, normally)
            os.killpg(head.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_shared_engine_inside_the_rank_trains_checkpoints_and_resumes(tiny_chat_model, spin_cache, tmp_path):
    """Transport ``shared``: the engine runs inside the one trainer rank and serves the actor's own
    parameters.  Every push is verified against the trainer's log-probs; a checkpoint (Megatron's
    writer forks helpers from the rank) leaves the engine serving; a resumed run loads the
    checkpoint into the actor and its first push re-binds the engine to the loaded weights.
    The first run places the rank with Ray (``trainer.use_ray=true``), the resumed one runs it
    inside the driver (the default for one CPU rank): a checkpoint does not depend on where its
    rank ran."""
    train = write_prompts(tmp_path / "train.jsonl", 12)
    run_dir = tmp_path / "run"
    common = [f"actor_rollout_ref.model.path={tiny_chat_model}", "actor_rollout_ref.rollout.sync.transport=shared",
              "actor_rollout_ref.rollout.sync.verify_every=1", f"data.train_files=[{train}]",
              f"data.val_files=[{train}]", "data.val_size=2", "data.train_batch_size=4", "data.max_response_length=10",
              "actor_rollout_ref.rollout.n=3", "reward_model.type=function",
              "reward_model.function=tests.e2e.test_online:length_reward", "actor_rollout_ref.actor.optim.lr=1e-3",
              "trainer.save_freq=1", f"trainer.default_local_dir={run_dir}"]
    first = run_cli(tmp_path, *common, "trainer.total_training_steps=2", "trainer.use_ray=true", cache=spin_cache)
    done = run_cli(tmp_path, *common, "trainer.total_training_steps=3", cache=spin_cache)
    assert "[resume] from" in done.stdout and "at step 2" in done.stdout
    assert RAY_STARTED in first.stdout + first.stderr and RAY_STARTED not in done.stdout + done.stderr
    steps = records(run_dir, "train")
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["sync/logprob_gap_max"] <= 1e-3, r  # the engine serves exactly the actor's weights
        assert r["weight_version"] == r["step"] and math.isfinite(r["loss"])
    assert steps[0]["loss"] != steps[2]["loss"]
    # Only the split QKV moves at a push: a small part of the model's bytes.
    params = sum(t.numel() * t.element_size() for t in checkpoint_tensors(
        run_dir / "checkpoints" / "step_00000003" / "actor").values() if isinstance(t, torch.Tensor))
    assert all(0 < r["sync/gbytes"] * 1e9 < 0.5 * params for r in steps), [r["sync/gbytes"] for r in steps]
    assert [r["step"] for r in records(run_dir, "eval")][-1] == 3  # the final evaluation, after the last checkpoint
    assert not (run_dir / "logs" / "engine-0.log").exists()  # no engine process of its own


def test_without_ray_the_rank_runs_in_the_driver_and_the_engine_is_its_child(tiny_chat_model, spin_cache, tmp_path):
    """A one-rank CPU run by default (``trainer.use_ray`` null), with an engine process of its own
    (transport tensor): no Ray starts, the one rank runs in the driver process, the engine is the
    driver's child; every push is verified against the actor and the run checkpoints."""
    train = write_prompts(tmp_path / "train.jsonl", 8)
    run_dir = tmp_path / "run"
    done = run_cli(tmp_path, f"actor_rollout_ref.model.path={tiny_chat_model}",
                   "actor_rollout_ref.rollout.sync.verify_every=1", f"data.train_files=[{train}]",
                   f"data.val_files=[{train}]", "data.val_size=2", "data.train_batch_size=4",
                   "data.max_response_length=10", "actor_rollout_ref.rollout.n=3", "reward_model.type=function",
                   "reward_model.function=tests.e2e.test_online:length_reward", "actor_rollout_ref.actor.optim.lr=1e-3",
                   "trainer.total_training_steps=2", f"trainer.default_local_dir={run_dir}", cache=spin_cache)
    assert RAY_STARTED not in done.stdout + done.stderr
    assert re.search(r"trainer ranks: \[\{'rank': 0, [^]]*'ray_node_id': None", done.stdout + done.stderr), \
        (done.stdout + done.stderr)[-3000:]  # the rank answered from outside any Ray node
    assert (run_dir / "logs" / "engine-0.log").read_text()  # the engine ran as a process of its own
    steps = records(run_dir, "train")
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:
        assert r["sync/logprob_gap_max"] <= 1e-3, r
        assert r["weight_version"] == r["step"] and math.isfinite(r["loss"])
    assert (run_dir / "checkpoints" / "step_00000002" / "actor").is_dir()
