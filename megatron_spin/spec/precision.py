"""Numeric precision of the Megatron model: parameter dtype and optional FP8 (TE only).

``actor_rollout_ref.actor.precision`` in the run config::

    precision: {params_dtype: bfloat16, fp8: {format: hybrid, recipe: delayed, amax_history_len: 1024}}
"""

from __future__ import annotations

import dataclasses
import enum
import functools
from typing import TYPE_CHECKING, Optional

from megatron_spin.errors import ConfigError, coerce_enums, require

if TYPE_CHECKING:
    import torch


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"


@functools.lru_cache(maxsize=1)
def torch_dtypes() -> dict:
    """DType -> torch dtype.  A function, not a module constant: the run config imports this module,
    and processes that only read the config (Ray's engine hosts) should not load torch."""
    import torch

    return {DType.FLOAT32: torch.float32, DType.BFLOAT16: torch.bfloat16, DType.FLOAT16: torch.float16}


class FP8Format(enum.StrEnum):
    E4M3 = "e4m3"  # e4m3 everywhere
    HYBRID = "hybrid"  # e4m3 forward, e5m2 gradients


class FP8Recipe(enum.StrEnum):
    DELAYED = "delayed"
    TENSORWISE = "tensorwise"
    BLOCKWISE = "blockwise"
    MXFP8 = "mxfp8"


class AmaxAlgo(enum.StrEnum):
    MAX = "max"
    MOST_RECENT = "most_recent"


class PrecisionError(ConfigError):
    """A precision this machine cannot run (FP8 without TransformerEngine and CUDA)."""


@dataclasses.dataclass(frozen=True)
class FP8Settings:
    """TransformerEngine FP8 GEMMs (needs CUDA + TE; refused at start-up otherwise)."""

    format: FP8Format = FP8Format.HYBRID
    recipe: FP8Recipe = FP8Recipe.DELAYED
    amax_history_len: int = 1024
    amax_compute_algo: AmaxAlgo = AmaxAlgo.MAX
    margin: int = 0

    def __post_init__(self) -> None:
        coerce_enums(self, format=FP8Format, recipe=FP8Recipe, amax_compute_algo=AmaxAlgo)
        require(self.amax_history_len >= 1, "amax_history_len", f"must be >= 1, got {self.amax_history_len}")
        require(self.margin >= 0, "margin", f"must be >= 0, got {self.margin}")


@dataclasses.dataclass(frozen=True)
class Precision:
    params_dtype: DType = DType.FLOAT32
    fp8: Optional[FP8Settings] = None

    def __post_init__(self) -> None:
        coerce_enums(self, params_dtype=DType)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtypes()[self.params_dtype]

    @property
    def sequence_multiple(self) -> int:
        """Sequence lengths a batch is padded to a multiple of: TransformerEngine's FP8 GEMMs need
        the token dimension divisible by 16 (the pad is masked out of the loss)."""
        return 16 if self.fp8 is not None else 1

    def transformer_config_kwargs(self) -> dict:
        """The TransformerConfig fields this precision sets."""
        kw: dict = {
            "params_dtype": self.torch_dtype,
            "pipeline_dtype": self.torch_dtype,
            "bf16": self.params_dtype == DType.BFLOAT16,
            "fp16": self.params_dtype == DType.FLOAT16,
        }
        if self.fp8 is not None:
            kw.update(
                fp8=str(self.fp8.format),
                fp8_recipe=str(self.fp8.recipe),
                fp8_margin=self.fp8.margin,
                fp8_amax_history_len=self.fp8.amax_history_len,
                fp8_amax_compute_algo=str(self.fp8.amax_compute_algo),
            )
        return kw
