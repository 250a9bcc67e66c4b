"""What a run checkpoint records beside the weights: the record a resumed run continues from."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from megatron_spin.ckpt import run_state


@dataclasses.dataclass(frozen=True)
class RunState:
    step: int  # the last completed step
    weight_version: int  # what the engines hold (the step of the last completed push)
    spin_iteration: int  # reference refreshes so far
    data: dict[str, Any]  # the prompt loader's position (PromptLoader.state_dict)
    evals: dict[int, float]  # held-out reward by step

    def to_json(self) -> dict:
        return {**dataclasses.asdict(self), "evals": {str(k): v for k, v in self.evals.items()}}

    @classmethod
    def read(cls, checkpoint: Path) -> "RunState":
        d = run_state.read_state(checkpoint)
        try:
            return cls(step=int(d["step"]), weight_version=int(d["weight_version"]),
                       spin_iteration=int(d["spin_iteration"]), data=dict(d["data"]),
                       evals={int(k): float(v) for k, v in d["evals"].items()})
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{checkpoint / run_state.STATE_FILE}: not a run state ({type(exc).__name__}: "
                             f"{exc})") from None
