"""The metric logger's backends write where they should, and a resume drops records after the checkpoint."""

from __future__ import annotations

import json

from megatron_spin.metrics.logger import MetricLogger
from megatron_spin.metrics.report import write_run_report


def test_jsonl_tensorboard_and_wandb_offline(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(var, raising=False)
    log = MetricLogger(tmp_path, ["console", "jsonl", "tensorboard", "wandb"], project="p", experiment="e",
                       config={"a": 1})
    log.log(0, {"reward/mean": 0.25}, kind="eval")
    for step in (1, 2):
        log.log(step, {"loss": 0.7 - 0.1 * step, "reward/mean": 0.1 * step, "timing/step": 1.0, "flag": True})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in lines] == [("eval", 0), ("train", 1), ("train", 2)]
    assert "flag" not in lines[1] and abs(lines[2]["loss"] - 0.5) < 1e-12
    assert list((tmp_path / "tensorboard").iterdir())
    assert list((tmp_path / "wandb").rglob("*.wandb"))  # an offline run file, under the run directory
    assert "[train step 2] reward/mean=0.2 loss=0.5" in capsys.readouterr().out


def test_resume_drops_records_after_the_checkpoint_and_appends(tmp_path):
    log = MetricLogger(tmp_path, ["jsonl"])
    for step in (1, 2, 3):
        log.log(step, {"loss": float(step)})
    log.close()
    log = MetricLogger(tmp_path, ["jsonl"], resume_step=2)
    log.log(3, {"loss": 30.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 30.0)]


def test_resume_survives_a_last_line_cut_short_by_the_crash(tmp_path):
    log = MetricLogger(tmp_path, ["jsonl"])
    for step in (1, 2):
        log.log(step, {"loss": float(step)})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "kind": "tr')  # killed mid-write
    log = MetricLogger(tmp_path, ["jsonl"], resume_step=2)
    log.log(3, {"loss": 3.0})
    log.close()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in lines] == [(1, 1.0), (2, 2.0), (3, 3.0)]


def test_report_states_the_held_out_change(tmp_path):
    log = MetricLogger(tmp_path, ["jsonl"])
    log.log(0, {"reward/mean": 0.2}, kind="eval")
    log.log(1, {"loss": 0.69, "reward/mean": 0.1, "timing/generate": 2.0, "timing/step": 5.0})
    log.log(1, {"reward/mean": 0.5}, kind="eval")
    log.close()
    report = write_run_report(tmp_path).read_text()
    assert "**0.2000 → 0.5000** (+0.3000) over 1 steps." in report
    assert "| 2.00 |" in report and (tmp_path / "reward_loss.png").stat().st_size > 1000
