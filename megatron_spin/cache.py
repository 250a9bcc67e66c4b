"""The one cache root: converted checkpoints, the packaged model and the packaged prompts.

``$MEGATRON_SPIN_CACHE`` when it is set and not empty, else ``~/.cache/megatron_spin``.  On a
cluster point it at shared storage, so that one node converts a model and the others reuse it.
Callers that are given an explicit directory never consult it.
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "MEGATRON_SPIN_CACHE"


def cache_root() -> Path:
    value = os.environ.get(CACHE_ENV, "").strip()  # empty means unset, never "the current directory"
    return Path(value or "~/.cache/megatron_spin").expanduser()
