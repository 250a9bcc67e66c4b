"""Runs as the report sees them: the records of one run directory, and the means the report prints.

A run directory holds ``config.json`` (the resolved config), ``metrics.jsonl`` (one record per
line, ``kind`` = ``train`` / ``eval`` / ``checkpoint``) and, in newer runs, ``ranks/rank_NNNNN.jsonl``
(one file per trainer rank, ``kind`` = ``train`` / ``sync``).  Reading is forgiving where a
real run can leave a mess, and strict where the input is simply wrong:

* no ``metrics.jsonl`` → ``FileNotFoundError`` naming the path (not a run directory);
* a torn line (a run killed mid-write) is skipped and counted, never fatal;
* a ``(kind, step)`` logged twice (a rank file appended to by a resumed run) keeps the last record;
* fields that newer runs log (``perf/*``, rank files) may be absent: their values are NaN,
  which the report prints as ``-``.

Every "mean" here is the plain mean of the per-step values over the kept training steps (all
of them, or all after the first ``warmup`` ones, whose compile/allocator warm-up would skew a
benchmark), skipping steps where the field is missing or not finite.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Iterable, Optional, Sequence

NAN = float("nan")
# Phases of a training step, in the order they run; "other" is the step time the named phases do
# not cover (Ray transfers, engine release/resume, reference refresh), "checkpoint" the run's save
# time spread over its steps, so that a stacked bar is the wall time per step.
PHASES = ("generate", "reward", "ref_logps", "train", "sync", "other", "checkpoint")


def mean(values: Iterable[Optional[float]]) -> float:
    kept = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return sum(kept) / len(kept) if kept else NAN


def finite(value: Optional[float]) -> bool:
    return value is not None and math.isfinite(value)


def read_jsonl(path: Path) -> tuple[list[dict], int]:
    """(records, number of unreadable lines) of a JSONL file; the last record of a (kind, step) wins."""
    by_key: dict = {}
    bad = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (record.get("kind", "train"), record["step"])
        except (ValueError, KeyError, TypeError, AttributeError):
            bad += 1
            continue
        by_key.pop(key, None)  # re-inserted last: a repeated step takes the position of its newest record
        by_key[key] = record
    return list(by_key.values()), bad


@dataclasses.dataclass
class RankSummary:
    """One trainer rank's mean timings over the kept steps."""

    rank: int
    node: str
    ray_node_id: str
    tp: Optional[int]
    pp: Optional[int]
    dp: Optional[int]
    steps: int
    ref_logps: float  # s per step
    train: float  # s per step
    send: float  # s per weight push
    tokens: float  # per step

    @property
    def busy(self) -> float:
        """ref_logps + train: the rank's compute part of a step (what a straggler stretches)."""
        parts = [v for v in (self.ref_logps, self.train) if finite(v)]
        return sum(parts) if parts else NAN


@dataclasses.dataclass
class Run:
    label: str
    path: Path
    config: dict
    all_train: list[dict]  # every training step, in step order (the plots)
    train: list[dict]  # the kept steps (the tables' means)
    evals: list[dict]
    checkpoints: list[dict]
    rank_records: Optional[list[dict]]  # None: the run has no ranks/ directory
    skipped_lines: int
    warmup: int

    def mean(self, key: str) -> float:
        return mean(r.get(key) for r in self.train)

    def first_last(self, key: str, records: Optional[Sequence[dict]] = None) -> tuple[float, float]:
        values = [r[key] for r in (self.all_train if records is None else records) if finite(r.get(key))]
        return (values[0], values[-1]) if values else (NAN, NAN)

    def series(self, key: str, per: Optional[str] = None, scale: float = 1.0) -> tuple[list, list]:
        """(steps, values) of a train field over all steps, divided by field ``per`` where given."""
        xs, ys = [], []
        for r in self.all_train:
            value, div = r.get(key), (r.get(per) if per else 1.0)
            if finite(value) and finite(div) and div:
                xs.append(r["step"])
                ys.append(value / div * scale)
        return xs, ys

    def per_device(self, key: str, devices: str) -> float:
        """Mean over kept steps of ``key / devices`` (both logged per step)."""
        return mean(r[key] / r[devices] for r in self.train if finite(r.get(key)) and finite(r.get(devices))
                    and r[devices])

    def step_breakdown(self) -> dict[str, float]:
        """Mean seconds per kept step of each phase in ``PHASES`` (NaN where the run did not log it)."""
        out = {p: self.mean(f"timing/{p}") for p in PHASES[:5]}
        step = self.mean("timing/step")
        named = sum(v for v in out.values() if finite(v))
        out["other"] = max(step - named, 0.0) if finite(step) else NAN
        kept = {r["step"] for r in self.train}
        saves = [c["timing/checkpoint"] for c in self.checkpoints
                 if c["step"] in kept and finite(c.get("timing/checkpoint"))]
        out["checkpoint"] = sum(saves) / len(kept) if saves and kept else NAN
        out["step"] = step
        return out

    def ranks(self) -> list[RankSummary]:
        """Per-rank means over the kept steps, ordered by rank."""
        if not self.rank_records:
            return []
        kept = {r["step"] for r in self.train}
        first_kept = min(kept) if kept else math.inf
        by_rank: dict[int, list[dict]] = {}
        for r in self.rank_records:
            by_rank.setdefault(int(r["rank"]), []).append(r)
        out = []
        for rank, recs in sorted(by_rank.items()):
            train = [r for r in recs if r.get("kind") == "train" and r["step"] >= first_kept]
            sync = [r for r in recs if r.get("kind") == "sync" and r["step"] >= first_kept]
            head = recs[-1]
            out.append(RankSummary(
                rank=rank, node=str(head.get("node", "?")), ray_node_id=str(head.get("ray_node_id", "") or ""),
                tp=head.get("tp"), pp=head.get("pp"), dp=head.get("dp"), steps=len(train),
                ref_logps=mean(r.get("timing/ref_logps") for r in train), train=mean(r.get("timing/train") for r in train),
                send=mean(r.get("timing/send") for r in sync), tokens=mean(r.get("tokens") for r in train)))
        return out


def run_labels(paths: Sequence[Path]) -> list[str]:
    """Short unique names: the directory name, with as many parents as it takes to tell runs apart."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [f"{label} #{i + 1}" for i, label in enumerate(labels)]  # the same directory given twice


def load_run(run_dir: str | Path, label: Optional[str] = None, warmup: int = 0) -> Run:
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{metrics}: not found — {run_dir} is not a run directory "
                                f"(every run writes metrics.jsonl there)")
    records, bad = read_jsonl(metrics)
    by_kind = {k: sorted((r for r in records if r.get("kind", "train") == k), key=lambda r: r["step"])
               for k in ("train", "eval", "checkpoint")}
    config_path = run_dir / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except ValueError:
        config, bad = {}, bad + 1
    rank_records = None
    if (run_dir / "ranks").is_dir():
        rank_records = []
        for path in sorted((run_dir / "ranks").glob("rank_*.jsonl")):
            recs, rank_bad = read_jsonl(path)  # every record names its rank
            rank_records += recs
            bad += rank_bad
    train = by_kind["train"]
    return Run(label=label or run_dir.name, path=run_dir, config=config, all_train=train,
               train=train[warmup:], evals=by_kind["eval"], checkpoints=by_kind["checkpoint"],
               rank_records=rank_records, skipped_lines=bad, warmup=warmup)


def cfg_get(config: dict, dotted: str, default=None):
    """A config value by dotted key, ``default`` where a section or key is missing (older/newer configs)."""
    node = config
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def ranges(numbers: Iterable[int]) -> str:
    """``0-3, 6, 8-9``: a sorted list of ranks, compressed."""
    nums = sorted(set(numbers))
    out, start = [], None
    for i, n in enumerate(nums):
        if start is None:
            start = n
        if i + 1 == len(nums) or nums[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(out)
