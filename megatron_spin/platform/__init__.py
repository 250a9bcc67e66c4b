"""The one place that knows CPU from CUDA and TransformerEngine from the local layer spec.

Everything else asks ``current()`` for a :class:`Platform` and uses its fields
(``device``, ``backend``, ``use_te``) instead of probing torch itself.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import warnings

import torch


@dataclasses.dataclass(frozen=True)
class Platform:
    """What this process can run on.

    device: torch device type tensors live on ("cuda" or "cpu").
    backend: torch.distributed backend for collectives ("nccl" or "gloo").
    has_te: TransformerEngine importable *and* CUDA present (TE needs both).
    """

    device: str
    backend: str
    has_te: bool

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def local_device(self) -> torch.device:
        """The device this process computes on (the launcher sets the CUDA device per rank)."""
        return torch.device("cuda", torch.cuda.current_device()) if self.is_cuda else torch.device("cpu")


def _te_importable() -> bool:
    return importlib.util.find_spec("transformer_engine") is not None


@functools.lru_cache(maxsize=1)
def current() -> Platform:
    """Detect the platform once per process."""
    if torch.cuda.is_available():
        return Platform(device="cuda", backend="nccl", has_te=_te_importable())
    return Platform(device="cpu", backend="gloo", has_te=False)


def prepare_megatron() -> Platform:
    """Make megatron-core usable on this platform and return it.

    With CUDA nothing is patched.  Without it the targeted CPU patches in
    :mod:`megatron_spin.platform.cpu_patches` are applied (idempotent).
    """
    plat = current()
    # Deprecation notices from torch's DCP / ShardedTensor APIs that megatron-core 0.16 uses
    # internally: nothing a megatron_spin user can change.
    for pattern in (".*Please use DTensor instead.*", ".*`load_state_dict` is deprecated.*",
                    ".*all_gather_into_tensor` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    if not plat.is_cuda:
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        # Megatron warns at import time about every fused kernel it cannot find; on a CPU
        # build that is expected and says nothing the user can act on.
        for pattern in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                        ".*Transformer Engine is not installed.*", ".*full scope is deprecated.*"):
            warnings.filterwarnings("ignore", message=pattern)
        from megatron_spin.platform import cpu_patches

        cpu_patches.apply()
    return plat
