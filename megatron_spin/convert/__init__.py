"""HF ↔ Megatron weight conversion: one table per architecture, shared by checkpoints and every weight push;
streaming HF ↔ dist-checkpoint conversion, the parity harness, and resolving the model a run starts from."""

from megatron_spin.convert.llama import LLAMA
from megatron_spin.convert.qwen2 import QWEN2
from megatron_spin.convert.qwen3 import QWEN3
from megatron_spin.convert.qwen3_moe import QWEN3_MOE
from megatron_spin.convert.table import ConverterTable, Param, canonical_name
from megatron_spin.spec.arch import ModelArch

_TABLES = {"llama": LLAMA, "qwen2": QWEN2, "qwen3": QWEN3, "qwen3_moe": QWEN3_MOE}


def converter_for(arch: ModelArch) -> ConverterTable:
    return _TABLES[arch.family]


__all__ = ["ConverterTable", "Param", "canonical_name", "converter_for"]
