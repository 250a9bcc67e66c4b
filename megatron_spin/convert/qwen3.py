"""Qwen3 dense family: Llama-shaped, no QKV bias, with an RMSNorm over head_dim on each query
and key head before RoPE (Megatron's ``qk_layernorm``)."""

from megatron_spin.convert.llama import llama_rules
from megatron_spin.convert.table import ConverterTable

QWEN3 = ConverterTable("qwen3", llama_rules(qk_layernorm=True))
