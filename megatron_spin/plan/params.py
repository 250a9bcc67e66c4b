"""Parameter counts per rank, exactly as Megatron-core's GPTModel allocates them.

Per transformer layer (h hidden, a heads, g KV heads, d head dim, f FFN size, TP t)::

    input RMSNorm            h                      (replicated over TP)
    linear_qkv               (a + 2g)·d·h / t       (+ (a + 2g)·d / t bias for Qwen2)
    q/k RMSNorm (Qwen3)      2·d                    (replicated over TP)
    linear_proj              h·a·d / t              (no bias: add_bias_linear=False)
    pre-MLP RMSNorm          h
    linear_fc1 (gate ‖ up)   2·f·h / t              (SwiGLU)
    linear_fc2               h·f / t

A mixture-of-experts layer (E experts of width f_e, top-k routing, EP e) replaces the MLP by::

    router                   E·h                    (replicated over TP and EP: TopKRouter.weight)
    experts                  (E / e)·3·f_e·h / t    (E/e experts per EP rank, each a SwiGLU split over
                                                    expert TP = TP: SequentialMLP's fc1 and fc2)

Only the expert weights are "expert parallel" (``allreduce=False`` in Megatron): the
distributed optimizer shards them over the expert-data-parallel ranks, everything else over
all data-parallel ranks (:mod:`memory`), hence :func:`rank_expert_params` on its own.
*Active* parameters (:func:`active_params`) count the k experts a token goes through instead
of all E: ``k·3·f_e·h`` per layer, plus everything else.

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


def expert_params(arch: ModelArch, tp: int = 1) -> int:
    """One expert's SwiGLU on one TP rank: 3·f_e·h / t (0 for a dense model)."""
    return 3 * arch.moe_ffn_hidden_size * arch.hidden_size // tp


def layer_expert_params(arch: ModelArch, tp: int = 1, ep: int = 1) -> int:
    """The experts one layer keeps on one rank: E/e of them (0 for a dense model)."""
    return arch.num_experts // ep * expert_params(arch, tp)


def layer_params(arch: ModelArch, tp: int = 1, ep: int = 1, *, experts: int | None = None) -> int:
    """One layer on one rank; ``experts`` overrides the E/e experts held (``active_params`` uses k)."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    qkv_out = (arch.num_attention_heads + 2 * arch.num_kv_heads) * d
    attn = qkv_out * h // tp + (qkv_out // tp if arch.qkv_bias else 0) + h * arch.num_attention_heads * d // tp
    if arch.is_moe:
        held = arch.num_experts // ep if experts is None else experts
        mlp = arch.num_experts * h + held * expert_params(arch, tp)  # router + experts
    else:
        mlp = 3 * f * h // tp
    qk_norms = 2 * d if arch.qk_layernorm else 0
    return attn + mlp + 2 * h + qk_norms  # input and pre-MLP RMSNorm weights, q/k norms


def embedding_params(arch: ModelArch, tp: int = 1) -> int:
    return padded_vocab_size(arch.vocab_size, tp) * arch.hidden_size // tp


def _layers_per_chunk(arch: ModelArch, layout: ParallelLayout) -> int:
    return arch.num_layers // (layout.pp * layout.chunks_per_rank)


def chunk_params(arch: ModelArch, layout: ParallelLayout, *, first: bool, last: bool) -> int:
    """One virtual-pipeline chunk: its layers, plus the embedding / final norm + output layer at the ends."""
    n = _layers_per_chunk(arch, layout) * layer_params(arch, layout.tp, layout.ep)
    if first:
        n += embedding_params(arch, layout.tp)
    if last:
        n += arch.hidden_size  # final RMSNorm
        if not (arch.tie_word_embeddings and first):
            n += embedding_params(arch, layout.tp)
    return n


def rank_params(arch: ModelArch, layout: ParallelLayout, pp_rank: int) -> int:
    """Parameters held by any rank of pipeline stage ``pp_rank`` (every TP and EP rank holds the same number)."""
    v = layout.chunks_per_rank
    return sum(
        chunk_params(arch, layout, first=pp_rank == 0 and c == 0, last=pp_rank == layout.pp - 1 and c == v - 1)
        for c in range(v)
    )


def rank_expert_params(arch: ModelArch, layout: ParallelLayout, pp_rank: int = 0) -> int:
    """The expert-parallel part of :func:`rank_params`: L/p layers × (E/e)·3·f_e·h/t.

    The same on every stage (experts live in the layers, not at the pipeline's ends)."""
    del pp_rank  # kept for symmetry with rank_params: every stage holds L/p layers
    return arch.num_layers // layout.pp * layer_expert_params(arch, layout.tp, layout.ep)


def model_params(arch: ModelArch) -> int:
    """Unique parameters of the whole model (what the HF checkpoint holds), all experts."""
    n = arch.num_layers * layer_params(arch) + embedding_params(arch) + arch.hidden_size
    return n if arch.tie_word_embeddings else n + embedding_params(arch)


def active_params(arch: ModelArch) -> int:
    """Parameters one token goes through: all but the E − k experts it is not routed to.

    Embeddings included (as in Qwen's published "activated" counts); the dense count for a
    dense model."""
    if not arch.is_moe:
        return model_params(arch)
    n = arch.num_layers * layer_params(arch, experts=arch.moe_top_k) + embedding_params(arch) + arch.hidden_size
    return n if arch.tie_word_embeddings else n + embedding_params(arch)
