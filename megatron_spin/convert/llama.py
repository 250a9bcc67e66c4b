"""Llama family (LlamaForCausalLM, Mistral-style without sliding window): the converter table."""

from megatron_spin.convert.table import COLUMN, REPLICATED, ROW, ConverterTable, Rule
from megatron_spin.convert.transforms import FUSED_GATE_UP, FUSED_QKV, IDENTITY, VOCAB_ROWS

_L = "decoder.layers.{layer}."
_H = "model.layers.{layer}."


def llama_rules(qkv_bias: bool = False, qk_layernorm: bool = False, mlp: list[Rule] | None = None) -> list[Rule]:
    """Rules for the Llama layer; Qwen2 adds a QKV bias, Qwen3 per-head q/k RMSNorms.  ``mlp``
    replaces the dense SwiGLU MLP's rules (Qwen3-MoE: a router and experts)."""
    rules = [
        # Vocabulary tables: rows padded for TP (if any) are dropped on the way to HF.
        Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VOCAB_ROWS, COLUMN),
        Rule(_L + "input_layernorm.weight", (_H + "input_layernorm.weight",), IDENTITY, REPLICATED),
        Rule(
            _L + "self_attention.linear_qkv.weight",
            tuple(_H + f"self_attn.{p}_proj.weight" for p in "qkv"),
            FUSED_QKV,
            COLUMN,
        ),
    ]
    if qkv_bias:
        rules.append(
            Rule(
                _L + "self_attention.linear_qkv.bias",
                tuple(_H + f"self_attn.{p}_proj.bias" for p in "qkv"),
                FUSED_QKV,
                COLUMN,
            )
        )
    if qk_layernorm:
        # One [head_dim] weight shared by every head, so every TP rank holds all of it.
        rules += [
            Rule(_L + f"self_attention.{p}_layernorm.weight", (_H + f"self_attn.{p}_norm.weight",), IDENTITY, REPLICATED)
            for p in "qk"
        ]
    rules += [
        Rule(_L + "self_attention.linear_proj.weight", (_H + "self_attn.o_proj.weight",), IDENTITY, ROW),
        Rule(_L + "pre_mlp_layernorm.weight", (_H + "post_attention_layernorm.weight",), IDENTITY, REPLICATED),
    ]
    rules += mlp if mlp is not None else swiglu_rules(_L + "mlp.", _H + "mlp.")
    rules += [
        Rule("decoder.final_layernorm.weight", ("model.norm.weight",), IDENTITY, REPLICATED),
        # Tied models have no separate output layer on either side.
        Rule("output_layer.weight", ("lm_head.weight",), VOCAB_ROWS, COLUMN,
             when=lambda arch: not arch.tie_word_embeddings),
    ]
    return rules


def swiglu_rules(megatron: str, hf: str) -> list[Rule]:
    """A SwiGLU MLP: HF's gate/up/down projections under ``hf``, Megatron's fused fc1 and fc2 under
    ``megatron`` (a dense layer's MLP, or one expert of a MoE layer)."""
    return [
        Rule(megatron + "linear_fc1.weight", (hf + "gate_proj.weight", hf + "up_proj.weight"), FUSED_GATE_UP, COLUMN),
        Rule(megatron + "linear_fc2.weight", (hf + "down_proj.weight",), IDENTITY, ROW),
    ]


LLAMA = ConverterTable("llama", llama_rules(qkv_bias=False))
