"""Numeric precision of the Megatron model: parameter dtype and optional FP8 (TE only)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FP8_FORMATS = ("e4m3", "hybrid")
_FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
_AMAX_ALGOS = ("max", "most_recent")


class PrecisionError(ValueError):
    pass


@dataclasses.dataclass(frozen=True)
class FP8Settings:
    """TransformerEngine FP8 (needs CUDA + TE; refused at start-up otherwise)."""

    format: str = "hybrid"  # e4m3 everywhere, or e4m3 forward / e5m2 backward
    recipe: str = "delayed"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("fp8.format", self.format, _FP8_FORMATS),
            ("fp8.recipe", self.recipe, _FP8_RECIPES),
            ("fp8.amax_compute_algo", self.amax_compute_algo, _AMAX_ALGOS),
        ):
            if value not in allowed:
                raise PrecisionError(f"{name}={value!r} is not one of {allowed}")
        if self.amax_history_len < 1:
            raise PrecisionError(f"fp8.amax_history_len={self.amax_history_len} must be >= 1")


@dataclasses.dataclass(frozen=True)
class Precision:
    params_dtype: str = "float32"
    fp8: Optional[FP8Settings] = None

    def __post_init__(self) -> None:
        if self.params_dtype not in DTYPES:
            raise PrecisionError(
                f"params_dtype={self.params_dtype!r} is not one of {tuple(DTYPES)}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.params_dtype]

    def transformer_config_kwargs(self) -> dict:
        """The TransformerConfig fields this precision sets."""
        kw: dict = {
            "params_dtype": self.torch_dtype,
            "pipeline_dtype": self.torch_dtype,
            "bf16": self.params_dtype == "bfloat16",
            "fp16": self.params_dtype == "float16",
        }
        if self.fp8 is not None:
            kw.update(
                fp8=self.fp8.format,
                fp8_recipe=self.fp8.recipe,
                fp8_margin=self.fp8.margin,
                fp8_amax_history_len=self.fp8.amax_history_len,
                fp8_amax_compute_algo=self.fp8.amax_compute_algo,
            )
        return kw
