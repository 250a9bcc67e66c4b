"""Qwen2 family: Llama-shaped with a bias on the fused QKV projection."""

from megatron_spin.convert.llama import llama_rules
from megatron_spin.convert.table import ConverterTable

QWEN2 = ConverterTable("qwen2", llama_rules(qkv_bias=True))
