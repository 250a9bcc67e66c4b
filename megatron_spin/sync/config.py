"""How the actor's weights reach the engines after every update (``actor_rollout_ref.rollout.sync``).

The transport, bucket size and wire dtype are configuration; where the push goes (the engines'
TP size and key, the directory a disk push writes to, the pusher's address) is known only once
the run has started, and travels separately as a :class:`PushTarget`.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from typing import Optional

from megatron_spin.errors import coerce_enums, require
from megatron_spin.spec.precision import DType
from megatron_spin.sync.routing import FeedRoute
from megatron_spin.wire.formats import LOAD_FORMATS


class TransportKind(enum.StrEnum):
    TENSOR = "tensor"  # /update_weights_from_tensor: the engine maps memory on its own device (same host)
    DISK = "disk"  # safetensors shards on storage every engine reads
    DISTRIBUTED = "distributed"  # a process group of the pushers and the engines (NCCL on GPUs)
    # The embedded engine runs inside the trainer rank and serves the actor's own parameters, as
    # views wherever the converter table maps one to one or by rows; a push copies only the rest
    # (the split QKV).  CPU, one trainer rank, one colocated embedded engine.
    SHARED = "shared"


@dataclasses.dataclass(frozen=True)
class SyncConfig:
    transport: TransportKind = TransportKind.TENSOR
    bucket_mb: float = 512.0  # tensors are sent in buckets of about this size (0: one tensor per bucket)
    dtype: Optional[DType] = None  # cast before sending (None: the actor's parameter dtype)
    load_format: Optional[str] = "flattened_bucket"  # tensor transport: one flat buffer per bucket, or null
    group_timeout_s: float = 300.0  # a broadcast no engine receives (distributed), a feeder's wait for its peers (tensor)
    verify_every: int = 0  # compare engine and trainer log-probs on a fixed probe every N pushes (0: never)
    verify_tolerance: float = 0.05  # stop the run when the mean |Δ log-prob| per probe token exceeds this

    def __post_init__(self) -> None:
        coerce_enums(self, transport=TransportKind, dtype=DType)
        require(math.isfinite(self.bucket_mb) and self.bucket_mb >= 0, "bucket_mb", f"must be >= 0, got {self.bucket_mb}")
        require(self.load_format in LOAD_FORMATS, "load_format",
                f"one of {', '.join('null' if f is None else f for f in LOAD_FORMATS)}; got {self.load_format!r}")
        require(self.group_timeout_s > 0, "group_timeout_s", f"must be > 0, got {self.group_timeout_s}")
        require(self.verify_every >= 0, "verify_every", f"must be >= 0, got {self.verify_every}")
        require(math.isfinite(self.verify_tolerance) and self.verify_tolerance > 0, "verify_tolerance",
                f"must be > 0, got {self.verify_tolerance}")

    @property
    def bucket_bytes(self) -> int:
        return int(self.bucket_mb * 1e6)


@dataclasses.dataclass(frozen=True)
class PushTarget:
    """Where a push goes: facts of the running fleet, not configuration."""

    engine_tp_size: int = 1  # ranks per engine (a tensor payload per rank; group ranks per engine)
    api_key: Optional[str] = None  # the engines accept weights only with it
    disk_dir: Optional[str] = None  # disk transport: a directory every engine can read
    side_files: Optional[str] = None  # disk transport: the model's config files, copied beside the weights
    route: Optional[FeedRoute] = None  # tensor transport: which trainer rank feeds which engine rank

    def __post_init__(self) -> None:
        if self.engine_tp_size < 1:
            raise ValueError(f"PushTarget.engine_tp_size must be >= 1, got {self.engine_tp_size}")
        if self.route is not None and any(len(f) != self.engine_tp_size for f in self.route.feeders):
            raise ValueError(f"PushTarget.route: every engine needs {self.engine_tp_size} feeders (one per TP rank)")
