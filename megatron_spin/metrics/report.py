"""The run report: ``report.md`` and ``reward_loss.png`` in the run directory, from ``metrics.jsonl``.

What a reader wants after a run: did the held-out reward rise (before → after, by how
much), how the training reward and the loss moved (the plot), and where the time of a step
went (generation, reward, reference log-probs, update, weight sync, checkpoint) with the
rollout throughput.  Written at the end of every run; rewritten the same way by
``write_run_report(run_dir)`` for a finished run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

TIMINGS = ("generate", "reward", "ref_logps", "train", "sync", "checkpoint", "step")


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _mean(values) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else float("nan")


def plot_reward_loss(records: list[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_r.plot([r["step"] for r in train], [r.get("reward/mean", float("nan")) for r in train], ".-",
              label="training samples (mean)")
    if evals:
        ax_r.plot([r["step"] for r in evals], [r["reward/mean"] for r in evals], "o-", label="held-out, greedy")
    ax_r.set_xlabel("step")
    ax_r.set_ylabel("reward")
    ax_r.set_title("reward")
    ax_r.grid(alpha=0.3)
    ax_r.legend()
    with_loss = [r for r in train if "loss" in r]
    ax_l.plot([r["step"] for r in with_loss], [r["loss"] for r in with_loss], ".-", color="tab:red")
    ax_l.axhline(math.log(2), color="gray", lw=0.8, ls="--", label="ln 2 (policy = reference)")
    ax_l.set_xlabel("step")
    ax_l.set_ylabel("DPO loss")
    ax_l.set_title("loss")
    ax_l.grid(alpha=0.3)
    ax_l.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def write_run_report(run_dir: str | Path, title: Optional[str] = None) -> Path:
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    train = [r for r in records if r["kind"] == "train"]
    evals = sorted((r for r in records if r["kind"] == "eval"), key=lambda r: r["step"])
    ckpts = [r for r in records if r["kind"] == "checkpoint"]
    plot = plot_reward_loss(records, run_dir / "reward_loss.png")
    cfg = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
    lines = [f"# {title or run_dir.name}", ""]
    if cfg:
        a, r = cfg["actor_rollout_ref"]["actor"], cfg["actor_rollout_ref"]["rollout"]
        lines += [f"Model `{cfg['actor_rollout_ref']['model']['path']}`, actor TP={a['tp']} PP={a['pp']}, "
                  f"{r['num_engines']} {r['engine']} engine(s); reward `{cfg['reward_model']['type']}`; "
                  f"loss `{cfg['algorithm']['dpo_loss_type']}` β={cfg['algorithm']['dpo_beta']}, lr={a['optim']['lr']}; "
                  f"{cfg['data']['train_batch_size']} prompts × {r['n']} samples per step"
                  f"{' (SPIN)' if cfg['algorithm']['spin'] else ''}.", ""]
    if len(evals) >= 2:
        before, after = evals[0]["reward/mean"], evals[-1]["reward/mean"]
        lines += ["## Held-out reward (greedy answers)", "",
                  "| step | mean reward |", "|---:|---:|"] + [f"| {e['step']} | {e['reward/mean']:.4f} |" for e in evals]
        lines += ["", f"**{before:.4f} → {after:.4f}** ({after - before:+.4f}) over {evals[-1]['step']} steps.", ""]
    lines += [f"![reward and loss]({plot.name})", ""]
    if train:
        timing = {k: _mean(r.get(f"timing/{k}") for r in train) for k in TIMINGS}
        timing["checkpoint"] = _mean(r.get("timing/checkpoint") for r in ckpts)
        lines += ["## Time per step (mean over steps, seconds)", "", "| " + " | ".join(TIMINGS) + " |",
                  "|" + "---:|" * len(TIMINGS),
                  "| " + " | ".join("-" if math.isnan(timing[k]) else f"{timing[k]:.2f}" for k in TIMINGS) + " |", "",
                  f"Rollout throughput {_mean(r.get('rollout/tokens_per_s') for r in train):.1f} tokens/s; "
                  f"weight push {_mean(r.get('sync/seconds') for r in train):.2f} s for "
                  f"{_mean(r.get('sync/gbytes') for r in train):.3f} GB; "
                  f"{sum(r.get('pairs/kept', 0) for r in train):.0f} pairs trained on, "
                  f"{sum(r.get('pairs/ties_skipped', 0) for r in train):.0f} ties skipped.", ""]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
