"""Parameter counts per rank, exactly as Megatron-core's GPTModel allocates them.

Per transformer layer (h hidden, a heads, g KV heads, d head dim, f FFN size, TP t)::

    input RMSNorm            h                      (replicated over TP)
    linear_qkv               (a + 2g)·d·h / t       (+ (a + 2g)·d / t bias for Qwen2)
    q/k RMSNorm (Qwen3)      2·d                    (replicated over TP)
    linear_proj              h·a·d / t              (no bias: add_bias_linear=False)
    pre-MLP RMSNorm          h
    linear_fc1 (gate ‖ up)   2·f·h / t              (SwiGLU)
    linear_fc2               h·f / t

The first pipeline chunk adds the word embedding ``V'·h / t`` (RoPE has no parameters); the
last adds the final RMSNorm ``h`` and the output layer ``V'·h / t`` — unless embeddings are
tied and both ends live on one rank (PP = 1), where the output layer reuses the embedding.
With tied embeddings and PP > 1 the last stage keeps its own copy (Megatron all-reduces the
two copies' gradients), so the sum over ranks then exceeds the model's unique count.
``V'`` is the vocabulary as built at TP ``t`` (``padded_vocab_size``: ``V`` itself when ``t``
divides it); the unique HF count (:func:`model_params`) is TP=1's, unpadded.
The TE layer spec fuses the norms into the next linear (``layer_norm_weight``): same counts.
"""

from __future__ import annotations

from megatron_spin.spec.arch import ModelArch
from megatron_spin.parallel.layout import ParallelLayout, padded_vocab_size


def layer_params(arch: ModelArch, tp: int = 1) -> int:
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_out = (arch.num_attention_heads + 2 * arch.num_kv_heads) * d
    attn = qkv_out * h // tp + (qkv_out // tp if arch.qkv_bias else 0) + h * arch.num_attention_heads * d // tp
    mlp = 3 * f * h // tp
    qk_norms = 2 * d if arch.qk_layernorm else 0
    return attn + mlp + 2 * h + qk_norms  # input and pre-MLP RMSNorm weights, q/k norms


def embedding_params(arch: ModelArch, tp: int = 1) -> int:
    return padded_vocab_size(arch.vocab_size, tp) * arch.hidden_size // tp


def chunk_params(arch: ModelArch, layout: ParallelLayout, *, first: bool, last: bool) -> int:
    """One virtual-pipeline chunk: its layers, plus the embedding / final norm + output layer at the ends."""
    layers = arch.num_layers // (layout.pp * layout.chunks_per_rank)
    n = layers * layer_params(arch, layout.tp)
    if first:
        n += embedding_params(arch, layout.tp)
    if last:
        n += arch.hidden_size  # final RMSNorm
        if not (arch.tie_word_embeddings and first):
            n += embedding_params(arch, layout.tp)
    return n


def rank_params(arch: ModelArch, layout: ParallelLayout, pp_rank: int) -> int:
    """Parameters held by any rank of pipeline stage ``pp_rank`` (every TP rank holds the same number)."""
    v = layout.chunks_per_rank
    return sum(
        chunk_params(arch, layout, first=pp_rank == 0 and c == 0, last=pp_rank == layout.pp - 1 and c == v - 1)
        for c in range(v)
    )


def model_params(arch: ModelArch) -> int:
    """Unique parameters of the whole model (what the HF checkpoint holds)."""
    n = arch.num_layers * layer_params(arch) + embedding_params(arch) + arch.hidden_size
    return n if arch.tie_word_embeddings else n + embedding_params(arch)
