"""Qwen3-MoE family (``Qwen3MoeForCausalLM``): Qwen3's attention, and in every layer a linear
router over ``num_experts`` SwiGLU experts instead of the dense MLP (no shared expert).

HF stores one gate/up/down triple per expert (``mlp.experts.{e}.gate_proj.weight``) and the
router as ``mlp.gate``; Megatron's MoE layer (SequentialMLP) holds the router as ``mlp.router``
and each expert as a fused fc1 / fc2 pair.  Expert indices in this table are global (EP=1):
a rank under expert parallelism holds experts ``ep_rank * E/EP ...``, which
``sync.gather.global_name`` and Megatron's sharded checkpoints both translate.  The router is
replicated across TP; each expert is split across TP like the dense MLP (expert TP = TP).
"""

from megatron_spin.convert.llama import llama_rules, swiglu_rules
from megatron_spin.convert.table import REPLICATED, ConverterTable, Rule
from megatron_spin.convert.transforms import IDENTITY

_L = "decoder.layers.{layer}.mlp."
_H = "model.layers.{layer}.mlp."

QWEN3_MOE = ConverterTable("qwen3_moe", llama_rules(qk_layernorm=True, mlp=[
    Rule(_L + "router.weight", (_H + "gate.weight",), IDENTITY, REPLICATED),
    *swiglu_rules(_L + "experts.local_experts.{expert}.", _H + "experts.{expert}."),
]))
