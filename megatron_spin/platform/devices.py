"""Node-local GPU indices → the ids a child process must see in ``CUDA_VISIBLE_DEVICES``.

Colocated engines and reward workers are pinned to GPUs by index on their node (Ray pins none
for an actor that reserves no GPU).  The index counts the GPUs this process may use, which is
not the hardware numbering when the scheduler narrowed them (Slurm may give a job GPUs 4-7 as
``CUDA_VISIBLE_DEVICES=4,5,6,7``): map through the inherited list.  Unverified on GPU.
"""

from __future__ import annotations

import os
from typing import Mapping, Optional, Sequence


def physical_gpu_ids(local: Sequence[int], env: Optional[Mapping[str, str]] = None) -> list[str]:
    env = os.environ if env is None else env
    visible = [x.strip() for x in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if x.strip()]
    if not visible:
        return [str(i) for i in local]
    bad = [i for i in local if not 0 <= i < len(visible)]
    if bad:
        raise ValueError(f"GPU index {bad[0]} is outside this process's CUDA_VISIBLE_DEVICES={','.join(visible)}")
    return [visible[i] for i in local]
