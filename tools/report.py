"""Benchmark report over one or several runs: ``report.md`` plus PNG figures, runs side by side.

Reads each run directory's ``config.json``, ``metrics.jsonl`` and (newer runs) ``ranks/*.jsonl``
and writes: the runs' setups; the time of a step split into generate / reward / ref_logps /
train / sync / other / checkpoint (stacked bars and means); rollout and training tokens/s per
device; MFU (training FLOP/s over devices × peak); weight-sync seconds and GB/s; training
reward, held-out reward and loss curves; and per trainer rank: nodes, mean timings, the
slowest rank.  Fields a run did not log show as ``-``.  No torch import: it takes seconds.

    python tools/report.py runs/megatron_spin/run                  # into the run directory
    python tools/report.py runs/a runs/b --out reports/a_vs_b --title "TP=2 vs TP=4"
    python tools/report.py runs/a runs/b --warmup 1                # means skip each run's first step

One run without ``--out``: the report goes into that run directory; several runs without
``--out``: into ``./report``.  Exit status: 0 written, 1 a run directory could not be read
(the message names the missing file), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_spin.metrics.report import write_report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories (hold metrics.jsonl)")
    p.add_argument("--out", type=Path, default=None,
                   help="report directory (default: the run directory for one run, ./report for several)")
    p.add_argument("--title", default=None, help="report title (default: the run names)")
    p.add_argument("--warmup", type=int, default=0, help="leave each run's first N training steps out of the means")
    args = p.parse_args(argv)
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    out = args.out or (args.run_dirs[0] if len(args.run_dirs) == 1 else Path("report"))
    try:
        report = write_report(args.run_dirs, out, title=args.title, warmup=args.warmup,
                              progress=lambda msg: print(msg, flush=True))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
