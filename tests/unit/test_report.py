"""The benchmark report over several runs: tables hold the runs' means, figures render, the CLI fails clearly.

Run directories are written the way a run writes them: ``config.json`` from the real run
config, ``metrics.jsonl`` through the real ``MetricLogger``, and hand-written
``ranks/rank_NNNNN.jsonl`` files in the per-rank format.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_spin.metrics.logger import MetricLogger
from megatron_spin.metrics.plots import RUN_COLORS
from megatron_spin.metrics.report import write_report, write_run_report

REPO = Path(__file__).resolve().parents[2]
CLI = REPO / "tools" / "report.py"
PHASES = ("generate", "reward", "ref_logps", "train", "sync")


def make_run(root: Path, name: str, *, scale: float, perf: bool, ranks: bool, steps: int = 4, tp: int = 2) -> dict:
    """A run of ``steps`` steps; returns what it logged: {"train": [...], "checkpoint": [...], "eval": [...]}."""
    from megatron_spin.config.run import ActorRolloutRefConfig, RolloutConfig, RunConfig, TrainerConfig, to_dict
    from megatron_spin.train.config import ActorConfig

    run_dir = root / name
    log = MetricLogger(run_dir, ["jsonl"])
    cfg = RunConfig(actor_rollout_ref=ActorRolloutRefConfig(actor=ActorConfig(tp=tp), rollout=RolloutConfig(n=3)),
                    trainer=TrainerConfig(nnodes=2, ray_address="auto"))  # several nodes: a Ray cluster
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg)))
    logged = {"train": [], "checkpoint": [], "eval": []}

    def put(step, record, kind="train"):
        log.log(step, record, kind=kind)
        logged[kind].append(record)

    put(0, {"reward/mean": 0.1 * scale}, "eval")
    for step in range(1, steps + 1):
        timing = {p: scale * (0.5 + 0.1 * i + 0.05 * step) for i, p in enumerate(PHASES)}
        record = {"loss": 0.69 - 0.05 * step * scale, "reward/mean": 0.2 * step * scale, "reward_accuracy": 0.5,
                  "pairs/kept": 4, "pairs/ties_skipped": 1, "rollout/tokens_per_s": 100.0 * step / scale,
                  "sync/seconds": 0.1 * scale, "sync/gbytes": 0.25, "sync/gbytes_per_s": 2.5 / scale + step,
                  "sync/engines": 2, "timing/train_total": timing["ref_logps"] + timing["train"] + 0.1,
                  **{f"timing/{p}": v for p, v in timing.items()}, "timing/step": sum(timing.values()) + 0.3}
        if perf:
            record.update({"perf/train_tokens": 512.0 * step, "perf/train_flops": 3e12 * step, "perf/devices": 4,
                           "perf/peak_flops_per_device": 989e12, "perf/mfu": 0.3 + 0.02 * step,
                           "perf/hfu": 0.4 + 0.02 * step,
                           "perf/achieved_tflops_per_device": 300.0 + step,
                           "perf/train_tokens_per_s_per_device": 40.0 + step, "perf/rollout_devices": 2})
        put(step, record)
        if step % 2 == 0:
            put(step, {"timing/checkpoint": 1.5 * scale + step}, "checkpoint")
    put(steps, {"reward/mean": 0.4 * scale}, "eval")
    log.close()
    if ranks:
        (run_dir / "ranks").mkdir()
        for rank in range(4):
            node, tp_rank, dp_rank = f"node{rank // 2 + 1}", rank % 2, rank // 2
            with open(run_dir / "ranks" / f"rank_{rank:05d}.jsonl", "w") as f:
                for step in range(1, steps + 1):
                    common = {"step": step, "rank": rank, "node": node, "ray_node_id": f"ray{rank // 2}abcdef0123456",
                              "tp": tp_rank, "pp": 0, "dp": dp_rank, "time": 1.0e9 + step}
                    f.write(json.dumps({**common, "kind": "train", "timing/ref_logps": 0.2 + 0.01 * rank,
                                        "timing/train": 1.0 + 0.1 * rank + 0.01 * step, "tokens": 256}) + "\n")
                    f.write(json.dumps({**common, "kind": "sync", "timing/send": 0.05 * (4 - rank)}) + "\n")
    return logged


def mean(values):
    values = list(values)
    return sum(values) / len(values)


def table_rows(report: str, heading: str) -> dict[str, list[str]]:
    """The first table after ``heading``: first cell (backticks stripped) → the other cells."""
    section = report.split(heading, 1)[1]
    rows = {}
    for line in section.splitlines():
        if line.startswith("| ") and not line.startswith("|---"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            rows[cells[0].strip("`")] = cells[1:]
        elif rows and not line.startswith("|"):
            break
    return rows


def assert_renders(png: Path) -> "numpy.ndarray":  # noqa: F821
    """The PNG decodes to a real picture: sensible size, not one flat colour."""
    import matplotlib.image as mpimg

    img = mpimg.imread(png)
    assert img.ndim == 3 and img.shape[2] in (3, 4), (png, img.shape)
    assert 200 <= img.shape[0] <= 3000 and 300 <= img.shape[1] <= 6000, (png, img.shape)
    assert img[..., :3].std() > 0.01, f"{png} is blank"
    return img


def pixels_of(img, hex_color: str, tol: float = 0.02) -> int:
    rgb = [int(hex_color[i:i + 2], 16) / 255 for i in (1, 3, 5)]
    return int(((abs(img[..., :3] - rgb) < tol).all(axis=-1)).sum())


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    a = make_run(root, "tp2", scale=1.0, perf=True, ranks=True)
    b = make_run(root, "tp1", scale=2.0, perf=False, ranks=False, tp=1)
    out = root / "report"
    report = write_report([root / "tp2", root / "tp1"], out, title="TP=2 vs TP=1").read_text()
    return root, out, report, a, b


def test_report_names_both_runs_and_tables_hold_their_means(two_runs):
    root, out, report, a, b = two_runs
    assert report.startswith("# TP=2 vs TP=1") and "`tp2`" in report and "`tp1`" in report
    times = table_rows(report, "## Time per step")
    for label, logged in (("tp2", a), ("tp1", b)):
        cells = dict(zip(("generate", "reward", "ref_logps", "train", "sync", "other", "checkpoint", "step"),
                         times[label]))
        for phase in PHASES:
            assert cells[phase] == f"{mean(r[f'timing/{phase}'] for r in logged['train']):.2f}", (label, phase)
        step = mean(r["timing/step"] for r in logged["train"])
        assert cells["step"] == f"{step:.2f}"
        assert cells["other"] == f"{step - sum(mean(r[f'timing/{p}'] for r in logged['train']) for p in PHASES):.2f}"
        saves = sum(c["timing/checkpoint"] for c in logged["checkpoint"]) / len(logged["train"])
        assert cells["checkpoint"] == f"{saves:.2f}"
    sync = table_rows(report, "## Weight sync")
    assert sync["tp2"][3] == f"{mean(r['sync/gbytes_per_s'] for r in a['train']):.3f}"
    assert sync["tp1"][1] == f"{mean(r['sync/seconds'] for r in b['train']):.3f}"
    rewards = table_rows(report, "## Reward and loss")
    assert rewards["tp2"][0] == "0.2000 → 0.8000 (+0.6000)" and rewards["tp1"][3] == "16"
    assert "- `tp2`: **0.1000 → 0.4000** (+0.3000) over 4 steps." in report
    assert "- `tp1`: **0.2000 → 0.8000** (+0.6000) over 4 steps." in report


def test_mfu_and_per_device_rates_shown_when_logged_dash_when_not(two_runs):
    _, _, report, a, _ = two_runs
    tput = table_rows(report, "## Throughput and MFU")
    mfu = mean(r["perf/mfu"] for r in a["train"])
    hfu = mean(r["perf/hfu"] for r in a["train"])
    assert tput["tp2"][-2:] == [f"{100 * mfu:.1f}%", f"{100 * hfu:.1f}%"] and tput["tp1"][-2:] == ["-", "-"]
    assert tput["tp2"][2] == f"{mean(r['rollout/tokens_per_s'] / 2 for r in a['train']):.1f}"  # per rollout device
    assert tput["tp2"][5] == f"{mean(r['perf/train_tokens_per_s_per_device'] for r in a['train']):.1f}"
    assert tput["tp2"][7] == f"{mean(r['perf/achieved_tflops_per_device'] for r in a['train']):.3g}"
    assert tput["tp1"][1:] == ["-"] * 10 and tput["tp1"][0] != "-"  # total rollout tokens/s is always logged
    summary = table_rows(report, "## Summary")
    assert summary["tp2"][4] == f"{100 * mfu:.1f}%" and summary["tp1"][4] == "-"


def test_per_rank_section_names_nodes_and_the_slowest_rank(two_runs):
    _, _, report, _, _ = two_runs
    ranks = report.split("## Per-rank timings", 1)[1]
    tp2, tp1 = ranks.split("### `tp1`")
    assert "4 trainer rank(s) on 2 node(s): `node1` (ranks 0-1); `node2` (ranks 2-3). Layout TP×PP×DP = 2×1×2." in tp2
    rows = table_rows(tp2, "| rank |")  # the per-rank table (its header row is the heading here)
    train3 = mean(1.0 + 0.3 + 0.01 * s for s in range(1, 5))
    assert rows["3"][6] == f"{train3:.3f}" and rows["3"][7] == f"{0.23 + train3:.3f}" and rows["0"][8] == "0.200"
    assert "Slowest rank: **3** on `node2`" in tp2 and "slowest weight send: rank 0 on `node1`" in tp2
    assert "No per-rank files" in tp1


def test_every_figure_is_referenced_renders_and_tells_runs_apart_by_colour(two_runs):
    _, out, report, _, _ = two_runs
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} == {"step_time", "throughput", "mfu", "sync", "reward_loss", "ranks"}
    referenced = set(re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report))
    assert referenced == {p.name for p in pngs}
    for png in pngs:
        assert_renders(png)
    assert RUN_COLORS[0] != RUN_COLORS[1]
    for name in ("reward_loss", "sync", "throughput"):  # both runs drawn, each in its own colour
        img = assert_renders(out / f"{name}.png")
        assert pixels_of(img, RUN_COLORS[0]) > 50 and pixels_of(img, RUN_COLORS[1]) > 50, name
    mfu = assert_renders(out / "mfu.png")  # only the run that logged MFU is drawn
    assert pixels_of(mfu, RUN_COLORS[0]) > 50 and pixels_of(mfu, RUN_COLORS[1]) < 50


def test_single_run_report_goes_into_the_run_dir(tmp_path):
    make_run(tmp_path, "only", scale=1.0, perf=False, ranks=False)
    report = write_run_report(tmp_path / "only")
    assert report == tmp_path / "only" / "report.md"
    text = report.read_text()
    assert text.startswith("# only") and "![reward and loss](reward_loss.png)" in text
    assert "## Held-out reward (greedy answers)" in text and "| 4 | 0.4000 |" in text
    assert_renders(tmp_path / "only" / "reward_loss.png")
    assert_renders(tmp_path / "only" / "step_time.png")
    assert not (tmp_path / "only" / "mfu.png").exists() and "Not logged by `only`: `perf/*`" in text


def test_warmup_steps_are_left_out_of_the_means(tmp_path):
    logged = make_run(tmp_path, "w", scale=1.0, perf=True, ranks=True)
    text = write_report([tmp_path / "w"], tmp_path / "out", warmup=1).read_text()
    times = table_rows(text, "## Time per step")
    assert times["w"][0] == f"{mean(r['timing/generate'] for r in logged['train'][1:]):.2f}"
    assert "first 1 training step(s)" in text


def test_run_without_train_records_still_gets_a_report(tmp_path):
    log = MetricLogger(tmp_path / "early", ["jsonl"])
    log.log(0, {"reward/mean": 0.25}, kind="eval")
    log.close()
    with open(tmp_path / "early" / "metrics.jsonl", "a") as f:
        f.write('{"step": 1, "kind": "tr')  # torn by a killed run
    text = write_run_report(tmp_path / "early").read_text()
    assert "**`early` has no train records**" in text and "1 unreadable line(s) skipped" in text
    assert table_rows(text, "## Time per step")["early"] == ["-"] * 9


def run_cli(*args, cwd):
    return subprocess.run([sys.executable, str(CLI), *map(str, args)], capture_output=True, text=True, cwd=cwd,
                          timeout=120)


def test_cli_missing_metrics_names_the_file(tmp_path):
    make_run(tmp_path, "good", scale=1.0, perf=False, ranks=False)
    (tmp_path / "empty").mkdir()
    done = run_cli(tmp_path / "good", tmp_path / "empty", "--out", tmp_path / "r", cwd=tmp_path)
    assert done.returncode == 1 and str(tmp_path / "empty" / "metrics.jsonl") in done.stderr
    assert not (tmp_path / "r" / "report.md").exists()
    assert run_cli(cwd=tmp_path).returncode == 2  # no run directory at all: usage error


def test_cli_several_runs_default_out_and_no_torch(tmp_path):
    make_run(tmp_path, "a", scale=1.0, perf=True, ranks=False)
    make_run(tmp_path, "b", scale=1.5, perf=False, ranks=False)
    done = run_cli("a", "b", "--title", "A vs B", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "read a: 4 train steps" in done.stdout and str(Path("report") / "report.md") in done.stdout
    assert (tmp_path / "report" / "report.md").read_text().startswith("# A vs B")
    probe = (f"import runpy, sys; sys.argv = ['report', 'a', '--out', 'probe']\n"
             f"try:\n    runpy.run_path({str(CLI)!r}, run_name='__main__')\n"
             f"except SystemExit as e:\n    assert e.code == 0\n"
             f"print('torch' in sys.modules, 'megatron.core' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert done.stdout.strip().splitlines()[-1] == "False False", done.stderr
