"""Send each step's metrics to the configured backends.

* ``jsonl``: ``metrics.jsonl`` in the run directory, one JSON object per record, flushed per
  line (a crash loses nothing already logged); records carry ``step`` and ``kind``
  (``train`` / ``eval``).  The run report and ``tools/report.py`` read this file.
* ``console``: one compact line per step.
* ``tensorboard``: scalars under ``<run_dir>/tensorboard``.
* ``wandb``: offline unless ``WANDB_MODE`` says otherwise (no network on the default run),
  files under the run directory, not ``./wandb``.
"""

from __future__ import annotations

import enum
import json
import math
import os
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence

class LoggerKind(enum.StrEnum):
    CONSOLE = "console"
    JSONL = "jsonl"
    TENSORBOARD = "tensorboard"
    WANDB = "wandb"


CONSOLE_KEYS = ("reward/mean", "loss", "reward_accuracy", "pairs/kept", "timing/step", "timing/checkpoint")


def open_jsonl(path: Path, resume_step: Optional[int]):
    """A JSONL file to append records to: emptied for a fresh run; when resuming from the
    checkpoint at ``resume_step``, records of later steps (written by the run that crashed) are
    dropped first (atomically), so every step appears once."""
    if resume_step is None:
        return open(path, "w", encoding="utf-8")
    if path.exists():
        kept = []
        for line in path.read_text().splitlines():
            try:
                if json.loads(line)["step"] <= resume_step:
                    kept.append(line)
            except (ValueError, KeyError):  # blank, or the last line cut short by the crash
                continue
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)
    return open(path, "a", encoding="utf-8")


class MetricLogger:
    def __init__(self, run_dir: str | os.PathLike, backends: Sequence[str], *, project: str = "megatron_spin",
                 experiment: str = "run", config: Optional[Mapping] = None, resume_step: Optional[int] = None):
        """``resume_step``: continuing a run from its checkpoint at this step — records logged
        after it (by the run that crashed) are dropped, so every step appears once."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.backends = tuple(backends)
        resume = resume_step is not None
        path = self.run_dir / "metrics.jsonl"
        self._jsonl = open_jsonl(path, resume_step) if "jsonl" in self.backends else None
        self._tb = None
        if "tensorboard" in self.backends:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        self._wandb = None
        if "wandb" in self.backends:
            import wandb

            os.environ.setdefault("WANDB_MODE", "offline")
            for var in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
                os.environ.setdefault(var, str(self.run_dir / "wandb"))
            (self.run_dir / "wandb").mkdir(exist_ok=True)
            self._wandb = wandb.init(project=project, name=experiment, dir=str(self.run_dir / "wandb"),
                                     config=dict(config or {}), resume="allow" if resume else None)

    def log(self, step: int, metrics: Mapping[str, float], kind: str = "train") -> None:
        clean = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        record = {"step": step, "kind": kind, "time": time.time(), **clean}
        if self._jsonl is not None:
            self._jsonl.write(json.dumps(record) + "\n")
            self._jsonl.flush()
        prefix = "" if kind == "train" else f"{kind}/"
        if self._tb is not None:
            for k, v in clean.items():
                if math.isfinite(v):
                    self._tb.add_scalar(prefix + k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log({prefix + k: v for k, v in clean.items()}, step=step)
        if "console" in self.backends:
            shown = [f"{k}={clean[k]:.4g}" for k in CONSOLE_KEYS if k in clean]
            from tqdm import tqdm

            tqdm.write(f"[{kind} step {step}] " + " ".join(shown))  # above a running progress bar

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
