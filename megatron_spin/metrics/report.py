"""The benchmark report: ``report.md`` + PNG figures over one run or several runs side by side.

What a reader wants after a run, or when comparing runs (layouts, engines, sizes):

* what each run was (model, actor TP×PP, devices, rollout fleet, batch, loss);
* where the time of a step went — generate, reward, reference log-probs, update, weight sync,
  the rest, and checkpoints spread over the steps — as stacked bars and a table of means;
* throughput: rollout tokens/s (whole fleet and per rollout device), training tokens/s per
  trainer device, and MFU = achieved training FLOP/s ÷ (devices × peak FLOP/s per device),
  as logged by the run (``perf/*``; older runs lack them and show ``-``);
* the weight push: seconds, GB and GB/s per step;
* whether training worked: training reward and loss curves, held-out reward before → after;
* per trainer rank (``ranks/*.jsonl``): which nodes and ranks took part, each rank's mean
  timings, and the slowest rank (a straggler sets the step time of all of them).

``write_run_report(run_dir)`` writes the single-run report into the run directory (called at
the end of every run); ``write_report(run_dirs, out_dir)`` merges several runs
(``tools/report.py`` is its command line).  Runs are read by ``metrics/runs.py``; figures are
drawn by ``metrics/plots.py``.  Nothing here imports torch: a report takes about a second.
"""

from __future__ import annotations

import datetime
import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_spin.metrics.plots import write_plots
from megatron_spin.metrics.runs import PHASES, Run, cfg_get, finite, load_run, ranges, run_labels

MAX_RANK_ROWS = 32  # more ranks than this: the per-node table and the slowest ranks only
SLOWEST_SHOWN = 8


def fmt(value: Optional[float], spec: str = ".2f") -> str:
    return format(value, spec) if finite(value) else "-"


def pct(value: Optional[float]) -> str:
    return f"{100 * value:.1f}%" if finite(value) else "-"


def table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> list[str]:
    """Markdown table lines: the first ``left`` columns left-aligned, numbers right-aligned."""
    return (["| " + " | ".join(header) + " |",
             "|" + "---|" * left + "---:|" * (len(header) - left)]
            + ["| " + " | ".join(row) + " |" for row in rows] + [""])


def change(first: float, last: float) -> str:
    return f"{first:.4f} → {last:.4f} ({last - first:+.4f})" if finite(first) and finite(last) else "-"


def describe(run: Run) -> list[str]:
    """One row of the runs table, from the run's resolved config (``-`` where a key is missing)."""
    def c(key: str, default="-"):
        return cfg_get(run.config, key, default)

    gpus = c("trainer.n_gpus_per_node", 0)
    where = f"{c('trainer.nnodes', 1)} node(s) × {gpus} GPU(s)" if gpus else f"{c('trainer.nnodes', 1)} node(s), CPU ranks"
    devices = run.mean("perf/devices")
    if finite(devices):
        where += f"; {devices:.0f} trainer ranks"
    tp_size = c("actor_rollout_ref.rollout.tp_size", 1)
    rollout = (f"{c('actor_rollout_ref.rollout.num_engines')} × {c('actor_rollout_ref.rollout.engine')}"
               f"{f' TP={tp_size}' if tp_size != 1 else ''}, {c('actor_rollout_ref.rollout.placement')}")
    per_step = f"{c('data.train_batch_size')} × {c('actor_rollout_ref.rollout.n')}" + (
        " (SPIN)" if c("algorithm.spin", False) else "")
    loss = (f"{c('algorithm.loss.loss_type')} β={c('algorithm.loss.beta')}, "
            f"lr={c('actor_rollout_ref.actor.optim.lr')}")
    return [f"`{run.label}`", f"`{c('actor_rollout_ref.model.path')}`",
            f"{c('actor_rollout_ref.actor.tp')}×{c('actor_rollout_ref.actor.pp')}", where, rollout, per_step,
            loss, str(len(run.all_train))]


def rollout_per_device(run: Run) -> float:
    return run.per_device("rollout/tokens_per_s", "perf/rollout_devices")


def summary_section(runs: Sequence[Run], plots: dict) -> list[str]:
    rows = []
    for run in runs:
        step = run.step_breakdown()
        evals = run.first_last("reward/mean", run.evals)
        rows.append([f"`{run.label}`", fmt(step["step"]), fmt(run.mean("rollout/tokens_per_s"), ".1f"),
                     fmt(rollout_per_device(run), ".1f"), fmt(run.mean("perf/train_tokens_per_s_per_device"), ".1f"),
                     pct(run.mean("perf/mfu")), fmt(run.mean("sync/gbytes_per_s"), ".3f"),
                     change(*run.first_last("reward/mean")), change(*evals)])
    return ["## Summary", ""] + table(
        ["run", "s/step", "rollout tok/s", "rollout tok/s/device", "train tok/s/device", "MFU", "sync GB/s",
         "training reward first → last", "held-out reward first → last"], rows)


def time_section(runs: Sequence[Run], plots: dict) -> list[str]:
    lines = ["## Time per step", ""]
    if "step_time" in plots:
        lines += ["![time per step](step_time.png)", ""]
    rows, notes = [], []
    for run in runs:
        b = run.step_breakdown()
        with_ckpt = (b["step"] + (b["checkpoint"] if finite(b["checkpoint"]) else 0.0)) if finite(b["step"]) else math.nan
        rows.append([f"`{run.label}`"] + [fmt(b[p]) for p in PHASES] + [fmt(b["step"]), fmt(with_ckpt)])
        saves = [c["timing/checkpoint"] for c in run.checkpoints if finite(c.get("timing/checkpoint"))]
        if saves:
            notes.append(f"`{run.label}`: {len(saves)} checkpoint(s), {sum(saves) / len(saves):.2f} s each on average.")
    lines += table(["run", *PHASES, "step", "step + checkpoint"], rows)
    lines += ["Seconds, mean over steps. `ref_logps` and `train` are the trainer's own timings of the "
              "reference forward and the update; `other` is the step time the named phases do not cover "
              "(transfers to and from the Ray workers, engine release/resume, reference refresh); "
              "`checkpoint` is the run's save time divided by its steps (saves happen outside `step`).", ""]
    return lines + ([" ".join(notes), ""] if notes else [])


def throughput_section(runs: Sequence[Run], plots: dict) -> list[str]:
    lines = ["## Throughput and MFU", ""]
    lines += [f"![{alt}]({name}.png)" for name, alt in (("throughput", "tokens per second"), ("mfu", "MFU"))
              if name in plots] + [""]
    rows = [[f"`{r.label}`", fmt(r.mean("rollout/tokens_per_s"), ".1f"), fmt(r.mean("perf/rollout_devices"), ".0f"),
             fmt(rollout_per_device(r), ".1f"), fmt(r.mean("perf/train_tokens"), ".0f"), fmt(r.mean("perf/devices"), ".0f"),
             fmt(r.mean("perf/train_tokens_per_s_per_device"), ".1f"), fmt(r.mean("perf/train_flops") / 1e12, ".3g"),
             fmt(r.mean("perf/achieved_tflops_per_device"), ".3g"), fmt(r.mean("perf/peak_flops_per_device") / 1e12, ".3g"),
             pct(r.mean("perf/mfu")), pct(r.mean("perf/hfu"))] for r in runs]
    lines += table(["run", "rollout tok/s", "rollout devices", "rollout tok/s/device", "train tokens/step",
                    "trainer devices", "train tok/s/device", "train TFLOP/step", "achieved TFLOP/s/device",
                    "peak TFLOP/s/device", "MFU", "HFU"], rows)
    lines += ["MFU: model FLOPs of the real tokens (actor forward + backward, reference forward) over the update's "
              "time × devices × peak; HFU also counts padding and the recompute forward.", ""]
    no_perf = [r.label for r in runs if not finite(r.mean("perf/train_flops"))]
    no_peak = [r.label for r in runs if r.label not in no_perf and not finite(r.mean("perf/mfu"))]
    if no_perf:
        lines += [f"Not logged by {', '.join(f'`{x}`' for x in no_perf)}: `perf/*` (training tokens, FLOPs, "
                  "devices); those columns show `-`.", ""]
    if no_peak:
        lines += [f"No MFU for {', '.join(f'`{x}`' for x in no_peak)}: the run knew no peak FLOP/s for its devices.", ""]
    return lines


def sync_section(runs: Sequence[Run], plots: dict) -> list[str]:
    lines = ["## Weight sync", ""] + (["![weight sync](sync.png)", ""] if "sync" in plots else [])
    rows = [[f"`{r.label}`", fmt(r.mean("sync/engines"), ".0f"), fmt(r.mean("sync/seconds"), ".3f"),
             fmt(r.mean("sync/gbytes"), ".3f"), fmt(r.mean("sync/gbytes_per_s"), ".3f"), fmt(r.mean("timing/sync"), ".3f")]
            for r in runs]
    return lines + table(["run", "engines", "push s", "GB", "GB/s", "sync phase s"], rows)


def reward_section(runs: Sequence[Run], plots: dict) -> list[str]:
    lines = ["## Reward and loss", ""]
    if "reward_loss" in plots:
        lines += ["![reward and loss](reward_loss.png)", ""]
    rows = [[f"`{r.label}`", change(*r.first_last("reward/mean")), change(*r.first_last("loss")),
             fmt(r.mean("reward_accuracy"), ".3f"), f"{sum(x.get('pairs/kept', 0) for x in r.all_train):.0f}",
             f"{sum(x.get('pairs/ties_skipped', 0) for x in r.all_train):.0f}"] for r in runs]
    lines += table(["run", "training reward first → last", "loss first → last", "reward accuracy", "pairs trained on",
                    "ties skipped"], rows)
    with_evals = [r for r in runs if r.evals]
    if not with_evals:
        return lines + ["No held-out evaluations were logged.", ""]
    steps = sorted({e["step"] for r in with_evals for e in r.evals})
    by_run = [{e["step"]: e.get("reward/mean") for e in r.evals} for r in with_evals]
    lines += ["## Held-out reward (greedy answers)", ""]
    lines += table(["step"] + [f"`{r.label}`" for r in with_evals],
                   [[str(s)] + [fmt(v.get(s), ".4f") for v in by_run] for s in steps])
    for r in with_evals:
        ok = [e for e in r.evals if finite(e.get("reward/mean"))]
        if len(ok) >= 2:
            before, after = ok[0]["reward/mean"], ok[-1]["reward/mean"]
            lines.append(f"- `{r.label}`: **{before:.4f} → {after:.4f}** ({after - before:+.4f}) "
                         f"over {ok[-1]['step'] - ok[0]['step']} steps.")
    return lines + [""]


def rank_section(runs: Sequence[Run], plots: dict) -> list[str]:
    lines = ["## Per-rank timings", ""] + (["![per-rank timings](ranks.png)", ""] if "ranks" in plots else [])
    for run in runs:
        lines += [f"### `{run.label}`", ""]
        if run.rank_records is None:
            lines += [f"No per-rank files (`{run.path / 'ranks'}` does not exist).", ""]
            continue
        ranks = run.ranks()
        if not ranks:
            lines += [f"No per-rank files with records in `{run.path / 'ranks'}`.", ""]
            continue
        nodes: dict[str, list] = {}
        for s in ranks:
            nodes.setdefault(s.node, []).append(s)
        layout = {(s.tp, s.pp, s.dp) for s in ranks}
        sizes = [max((x[i] for x in layout if x[i] is not None), default=-1) + 1 for i in range(3)]
        lines += [f"{len(ranks)} trainer rank(s) on {len(nodes)} node(s): "
                  + "; ".join(f"`{n}` (ranks {ranges(s.rank for s in members)})" for n, members in nodes.items())
                  + (f". Layout TP×PP×DP = {sizes[0]}×{sizes[1]}×{sizes[2]}." if min(sizes) > 0 else "."), ""]
        lines += table(["node", "ranks", "Ray node", "ref_logps s", "train s", "ref_logps + train s (max rank)",
                        "send s"],
                       [[f"`{n}`", ranges(s.rank for s in m), f"`{m[0].ray_node_id[:12]}`" if m[0].ray_node_id else "-",
                         fmt(_mean(s.ref_logps for s in m), ".3f"), fmt(_mean(s.train for s in m), ".3f"),
                         fmt(max((s.busy for s in m if finite(s.busy)), default=math.nan), ".3f"),
                         fmt(_mean(s.send for s in m), ".3f")] for n, m in nodes.items()], left=3)
        timed = sorted((s for s in ranks if finite(s.busy)), key=lambda s: s.busy, reverse=True)
        shown = ranks if len(ranks) <= MAX_RANK_ROWS else timed[:SLOWEST_SHOWN]
        if len(ranks) > MAX_RANK_ROWS:
            lines += [f"The {len(shown)} slowest of {len(ranks)} ranks:", ""]
        lines += table(["rank", "node", "tp", "pp", "dp", "steps", "ref_logps s", "train s", "ref_logps + train s",
                        "send s", "tokens/step"],
                       [[str(s.rank), f"`{s.node}`", _int(s.tp), _int(s.pp), _int(s.dp), str(s.steps),
                         fmt(s.ref_logps, ".3f"), fmt(s.train, ".3f"), fmt(s.busy, ".3f"), fmt(s.send, ".3f"),
                         fmt(s.tokens, ".0f")] for s in shown], left=2)
        lines += [_slowest(ranks, timed), ""]
    return lines


def _slowest(ranks, timed) -> str:
    if not timed:
        return "No rank logged training timings."
    slow, fast = timed[0], timed[-1]
    text = (f"Slowest rank: **{slow.rank}** on `{slow.node}`, {slow.busy:.3f} s of ref_logps + train per step"
            f" ({slow.busy / fast.busy:.2f}× the fastest, rank {fast.rank} at {fast.busy:.3f} s)" if fast.busy > 0 else
            f"Slowest rank: **{slow.rank}** on `{slow.node}`, {slow.busy:.3f} s of ref_logps + train per step")
    senders = sorted((s for s in ranks if finite(s.send)), key=lambda s: s.send, reverse=True)
    if senders:
        text += f"; slowest weight send: rank {senders[0].rank} on `{senders[0].node}`, {senders[0].send:.3f} s per push"
    return text + "."


def _mean(values) -> float:
    kept = [v for v in values if finite(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _int(value) -> str:
    return "-" if value is None else str(value)


def render(runs: Sequence[Run], plots: dict, title: str) -> str:
    warmup = runs[0].warmup if runs else 0
    lines = [f"# {title}", "",
             f"{len(runs)} run(s); report written {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}. "
             + (f"Means skip each run's first {warmup} training step(s) (warm-up); plots show every step."
                if warmup else "Means are over all training steps."), ""]
    lines += table(["run", "model", "actor TP×PP", "trainer", "rollout engines", "prompts × samples", "loss",
                    "train steps"], [describe(r) for r in runs], left=8)
    for r in runs:
        if not r.all_train:
            lines += [f"**`{r.label}` has no train records** (`{r.path / 'metrics.jsonl'}`: the run stopped before "
                      f"its first step finished, or has not got there yet); its columns show `-`.", ""]
        elif not r.train:
            lines += [f"**`{r.label}` has no training steps after the warm-up** ({len(r.all_train)} logged).", ""]
        if r.skipped_lines:
            lines += [f"`{r.label}`: {r.skipped_lines} unreadable line(s) skipped (torn by a killed run?).", ""]
    for section in (summary_section, time_section, throughput_section, sync_section, reward_section, rank_section):
        lines += section(runs, plots)
    return "\n".join(lines)


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path, title: Optional[str] = None, *,
                 warmup: int = 0, progress: Optional[Callable[[str], None]] = None) -> Path:
    """Read the runs, draw the figures into ``out_dir``, write ``out_dir/report.md``; returns its path.

    Raises ``FileNotFoundError`` naming the file when a run directory has no ``metrics.jsonl``."""
    if not run_dirs:
        raise ValueError("write_report needs at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = []
    for path, label in zip(paths, run_labels(paths)):
        run = load_run(path, label=label, warmup=warmup)
        runs.append(run)
        if progress:
            files = ("no ranks/ files" if run.rank_records is None
                     else f"{len({r['rank'] for r in run.rank_records})} rank file(s)")
            progress(f"read {path}: {len(run.all_train)} train steps, {len(run.evals)} evals, "
                     f"{len(run.checkpoints)} checkpoints, {files}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plots = write_plots(runs, out_dir)
    title = title or (runs[0].label if len(runs) == 1 else "Runs compared: " + ", ".join(r.label for r in runs))
    out = out_dir / "report.md"
    out.write_text(render(runs, plots, title))
    if progress:
        progress(f"wrote {out} and {len(plots)} figure(s): {', '.join(p.name for p in plots.values())}")
    return out


def write_run_report(run_dir: str | Path, title: Optional[str] = None) -> Path:
    """The single-run report, into the run directory (``report.md``, ``reward_loss.png``, ...)."""
    return write_report([run_dir], run_dir, title=title or Path(run_dir).name)
