"""The report's figures: one PNG per question, several runs side by side on shared axes.

Each run keeps one colour in every figure (``run_color``); phases of a step keep theirs
(``PHASE_COLORS``), drawn from a different palette so a phase is never mistaken for a run.
Figures are built on ``matplotlib.figure.Figure`` with an Agg canvas, not through pyplot: no
global backend switch in the importing process, nothing left open between figures.  A figure
with no data in any panel is not written (the plotting function returns ``None``; a PNG of that
name left by an earlier report is removed) and a panel without data says so instead of staying
blank.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_spin.metrics.runs import PHASES, RankSummary, Run, finite

# matplotlib's tab10, spelled out: tests and readers can find a run's colour in the pixels.
RUN_COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
              "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf")
# ColorBrewer Set2 (+ grey for "other"): pastel, so stacked phases never read as run colours.
PHASE_COLORS = {"generate": "#66c2a5", "reward": "#fc8d62", "ref_logps": "#8da0cb", "train": "#e78ac3",
                "sync": "#a6d854", "other": "#cccccc", "checkpoint": "#ffd92f"}
DPI = 110

Series = Callable[[Run], tuple[list, list]]


def run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def _line_style(index: int) -> str:
    return ("-", "--", ":", "-.")[(index // len(RUN_COLORS)) % 4]  # > 10 runs: colours repeat, styles do not


def _figure(ncols: int, width: float = 4.2, height: float = 3.4):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(width * ncols, 6.0), height))
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks():
    from matplotlib.ticker import MaxNLocator

    return MaxNLocator(integer=True)  # steps and ranks are whole numbers


def _no_data(ax, what: str = "not logged by these runs") -> None:
    ax.text(0.5, 0.5, what, ha="center", va="center", transform=ax.transAxes, color="gray")


def _save(fig, out: Path, top: float = 1.0) -> Path:
    fig.tight_layout(rect=(0, 0, 1, top))  # top < 1: room for the run legend above the panels
    fig.savefig(out, dpi=DPI)
    return out


def plot_curves(runs: Sequence[Run], panels: Sequence[tuple[str, str, Series]], out: Path,
                hlines: Optional[dict[int, tuple[float, str]]] = None) -> Optional[Path]:
    """Per-step curves: one panel per (title, y label, series), one coloured line per run.

    ``hlines``: panel index → (y, label) of a reference line (ln 2 on the loss panel)."""
    fig = _figure(len(panels))
    axes = fig.subplots(1, len(panels), sharex=True, squeeze=False)[0]
    drawn: set[int] = set()  # runs with data in some panel: the legend lists only these
    for ax, (title, ylabel, series) in zip(axes, panels):
        in_panel = False
        for i, run in enumerate(runs):
            xs, ys = series(run)
            if xs:
                # Earlier runs are drawn wider: runs that coincide (e.g. TP=1 vs TP=2 of the same
                # seed) stay visible as a coloured rim around the later run's line.
                wide = (len(runs) - 1 - i) / max(len(runs) - 1, 1)
                ax.plot(xs, ys, _line_style(i), marker="o", ms=3.5 + 2 * wide, lw=1.4 + 1.4 * wide,
                        color=run_color(i), label=run.label)
                in_panel = True
                drawn.add(i)
        if not in_panel:
            _no_data(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(_integer_ticks())
    for index, (y, label) in (hlines or {}).items():
        line = axes[index].axhline(y, color="gray", lw=0.8, ls="--", label=label)
        axes[index].legend(handles=[line], fontsize=7, loc="best")  # the runs are in the figure legend
    if not drawn:
        return None
    return _save(fig, out, _run_legend(fig, runs, drawn))


def _run_legend(fig, runs: Sequence[Run], drawn: Optional[set[int]] = None) -> float:
    """One legend for the whole figure, above the panels (run → colour); returns the panels' top.

    ``drawn``: indices of the runs that have data here (default all); a run keeps its colour
    (its index in ``runs``) whether or not the runs before it are drawn."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=run_color(i), ls=_line_style(i), marker="o", label=r.label)
               for i, r in enumerate(runs) if drawn is None or i in drawn]
    rows = math.ceil(len(handles) / 4)
    fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    return 1.0 - (0.03 + 0.07 * rows) * 3.4 / fig.get_figheight()


def plot_step_time(runs: Sequence[Run], breakdowns: Sequence[dict], out: Path) -> Optional[Path]:
    """Stacked bars, one per run: mean seconds per step in each phase (checkpoint spread over steps)."""
    if not any(finite(b.get(p)) for b in breakdowns for p in PHASES):
        return None
    fig = _figure(1, width=max(2.0 + 1.3 * len(runs), 6.5), height=4.0)
    ax = fig.subplots()
    xs = list(range(len(runs)))
    bottoms = [0.0] * len(runs)
    for phase in PHASES:
        heights = [b.get(phase) if finite(b.get(phase)) else 0.0 for b in breakdowns]
        ax.bar(xs, heights, 0.6, bottom=bottoms, color=PHASE_COLORS[phase], edgecolor="white", lw=0.5, label=phase)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    for x, total in zip(xs, bottoms):
        if total > 0:
            ax.annotate(f"{total:.2f} s", (x, total), ha="center", va="bottom", fontsize=8,
                        xytext=(0, 2), textcoords="offset points")
    crowded = len(runs) > 3
    ax.set_xticks(xs, [r.label for r in runs], rotation=20 if crowded else 0, ha="right" if crowded else "center")
    for i, tick in enumerate(ax.get_xticklabels()):
        tick.set_color(run_color(i))
    ax.set_ylabel("seconds per step (mean)")
    ax.set_title("time per training step", fontsize=10)
    ax.set_ylim(0, max(bottoms) * 1.15 or 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, out)


def plot_ranks(runs: Sequence[Run], summaries: Sequence[Sequence[RankSummary]], out: Path) -> Optional[Path]:
    """Grouped bars per trainer rank, one colour per run: ref_logps + train per step, send per push."""
    if not any(summaries):
        return None
    with_ranks = [i for i, s in enumerate(summaries) if s]  # only these share a rank's slot
    fig = _figure(2, width=min(8.0, max(4.2, 0.25 * max(len(s) for s in summaries) * len(with_ranks))))
    axes = fig.subplots(1, 2, sharex=True)
    width = 0.8 / len(with_ranks)
    for ax, (title, value) in zip(axes, (("ref_logps + train per step (s)", lambda s: s.busy),
                                         ("weight send per push (s)", lambda s: s.send))):
        in_panel = False
        for slot, i in enumerate(with_ranks):
            points = [(s.rank, value(s)) for s in summaries[i] if finite(value(s))]
            if points:
                ax.bar([r + (slot - (len(with_ranks) - 1) / 2) * width for r, _ in points], [v for _, v in points],
                       width, color=run_color(i), label=runs[i].label)
                in_panel = True
        if not in_panel:
            _no_data(ax)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("trainer rank")
        ax.xaxis.set_major_locator(_integer_ticks())
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, out, _run_legend(fig, runs, set(with_ranks)))


def write_plots(runs: Sequence[Run], out_dir: Path) -> dict[str, Path]:
    """Every figure the runs have data for: name → path (names are the PNG stems)."""
    pct = 100.0
    figures = {
        "step_time": lambda out: plot_step_time(runs, [r.step_breakdown() for r in runs], out),
        "throughput": lambda out: plot_curves(runs, [
            ("rollout tokens/s (all engines)", "tokens/s", lambda r: r.series("rollout/tokens_per_s")),
            ("rollout tokens/s per device", "tokens/s",
             lambda r: r.series("rollout/tokens_per_s", per="perf/rollout_devices")),
            ("training tokens/s per device", "tokens/s", lambda r: r.series("perf/train_tokens_per_s_per_device")),
        ], out),
        "mfu": lambda out: plot_curves(runs, [
            ("model FLOPs utilisation (training)", "MFU (%)", lambda r: r.series("perf/mfu", scale=pct))], out),
        "sync": lambda out: plot_curves(runs, [
            ("weight push time", "seconds", lambda r: r.series("sync/seconds")),
            ("weight push bandwidth", "GB/s", lambda r: r.series("sync/gbytes_per_s")),
        ], out),
        "reward_loss": lambda out: plot_curves(runs, [
            ("training reward (mean over samples)", "reward", lambda r: r.series("reward/mean")),
            ("held-out reward (greedy)", "reward", _held_out),
            ("loss", "DPO loss", lambda r: r.series("loss")),
        ], out, hlines={2: (math.log(2), "ln 2 (policy = reference)")}),
        "ranks": lambda out: plot_ranks(runs, [r.ranks() for r in runs], out),
    }
    written = {}
    for name, draw in figures.items():
        path = draw(out_dir / f"{name}.png")
        if path is not None:
            written[name] = path
        else:  # a figure of an earlier report here would sit beside a report that no longer shows it
            (out_dir / f"{name}.png").unlink(missing_ok=True)
    return written


def _held_out(run: Run) -> tuple[list, list]:
    points = [(e["step"], e["reward/mean"]) for e in run.evals if finite(e.get("reward/mean"))]
    return [s for s, _ in points], [v for _, v in points]
