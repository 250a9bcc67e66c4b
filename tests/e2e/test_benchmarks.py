"""Every benchmark still runs: each in its quick mode (tiny sizes), its figures checked for sense.

Benchmarks rot when nothing runs them; these are the seconds-long versions of what
``benchmarks/*.py`` measure, so a benchmark that breaks fails the suite.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(900)]
BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def cache(spin_cache, smollm2_dir) -> str:
    """The session's cache, the packaged model already in it: a benchmark finds it materialised, as
    on any machine that has run one before (the materialisation itself is tested on its own)."""
    return os.environ.get("MEGATRON_SPIN_CACHE") or str(spin_cache)


def run(tmp_path, cache, script, *extra) -> dict:
    out = tmp_path / f"{script}.json"
    env = {**os.environ, "PYTHONPATH": str(BENCH.parent), "MEGATRON_SPIN_CACHE": cache}
    done = subprocess.run([sys.executable, str(BENCH / f"{script}.py"), "--quick", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=850, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text())


def test_convert_benchmark(tmp_path, cache):
    fig = run(tmp_path, cache, "convert", "--workdir", str(tmp_path / "w"))
    assert fig["roundtrip_bit_exact"] and fig["seconds"]["hf_to_megatron"] > 0


def test_train_step_benchmark(tmp_path, cache):
    fig = run(tmp_path, cache, "train_step", "--workdir", str(tmp_path / "w"))
    assert fig["matmul_gflops"] > 0 and fig["seq_len"] == 32
    update = fig["phases"]["actor update (train_step)"]
    assert update["mean_s"] > 0 and update["gflops"] > 0
    assert fig["last_step_metrics"]["loss"] > 0


def test_weight_sync_benchmark(tmp_path, cache):
    fig = run(tmp_path, cache, "weight_sync", "--workdir", str(tmp_path / "w"))
    push, gen = fig["push"], fig["generation"]
    assert {r["transport"] for r in push["rows"]} == {"tensor", "disk", "shared"}
    assert all(r["seconds"] > 0 and r["logprob_gap"] <= 1e-4 for r in push["rows"]), push["rows"]
    assert gen["engine_tok_s"] > 0 and gen["identical_outputs"] == gen["prompts"]


def test_vs_trl_benchmark(tmp_path, cache):
    summary = run(tmp_path, cache, "vs_trl", "--workdir", str(tmp_path / "w"))
    for side in ("trl", "ours"):
        s = summary[side]
        assert s["step_s"] > 0 and s["peak_pss_gb"] > 0.2 and s["pairs_per_step"] >= 1, (side, s)
    assert summary["step_time_ratio_trl_over_ours"] > 0 and summary["memory_ratio_ours_over_trl"] > 0
    # Memory comes from runs of their own (the sampler slows what it samples); times from runs without it.
    assert [len(summary[k][side]) for k in ("runs", "memory_runs") for side in ("trl", "ours")] == [1, 1, 1, 1]
    assert all("peak_pss_gb" not in r for side in ("trl", "ours") for r in summary["runs"][side])


def test_cpu_linear_benchmark(tmp_path, cache):
    fig = run(tmp_path, cache, "cpu_linear")
    assert set(fig["shapes"]) == {"proj", "head"} and fig["threads"] >= 1
    for per in fig["shapes"].values():
        assert all(r["plain_ms"] > 0 and r["weight_first_ms"] > 0 for r in per.values()), per
