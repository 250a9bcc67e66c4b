"""tools/gpu_check.py runs every check end to end (tiny sizes, on the CPU) and reports them in JSON.

On a GPU the same script measures the real figures; here it proves the script itself works, so
that a lent GPU's minutes are not spent on a broken tool.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.timeout(600)]
TOOL = Path(__file__).resolve().parents[2] / "tools" / "gpu_check.py"


def test_every_check_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, str(TOOL), "--cpu-smoke", "--json", str(tmp_path / "out.json"),
                           "--workdir", str(tmp_path / "work")], capture_output=True, text=True, timeout=580)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary == json.loads((tmp_path / "out.json").read_text())
    checks = summary["checks"]
    assert set(checks) == {"platform", "parity", "update", "push", "resume", "moe"}
    assert all(c["ok"] for c in checks.values()), {k: c.get("error") for k, c in checks.items()}
    assert checks["platform"]["platform"]["device"] == "cpu"
    assert checks["parity"]["float32"]["max_logprob_diff"] <= 1e-4
    assert checks["update"]["achieved_tflops"] > 0 and 0 < checks["update"]["mfu"] < 1
    assert checks["push"]["push_gb_per_s"] > 0 and checks["push"]["probe_mean_gap"] <= 1e-4
    assert checks["resume"]["bit_exact"] and checks["resume"]["losses_straight"] == checks["resume"]["losses_resumed"]
    assert checks["moe"]["float32"]["max_logprob_diff"] <= 1e-4 and checks["moe"]["update"]["grad_norm"] > 0


def test_a_failing_check_is_reported_and_fails_the_run(tmp_path):
    """A check that cannot run (here: asking for GPU sizes on a CPU-only machine) reports its
    error and makes the exit status 1; the others still run."""
    done = subprocess.run([sys.executable, str(TOOL), "--only", "platform"], capture_output=True, text=True,
                          timeout=120)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 1 and summary["ok"] is False
    assert "no CUDA device" in summary["checks"]["platform"]["error"]
