"""Model FLOPs of a step: forward per token, training, reference pass and generation.

Used by the planner and by the trainer to log MFU, so this file imports nothing heavy and
every function is a few multiplications.

Forward FLOPs per token (a multiply-add counts 2)::

    2 · matmul weights                      per layer: (a + 2g)·d·h  (QKV)  +  a·d·h  (proj)
                                                       + 3·f·h  (SwiGLU: gate, up, down)
                                            once:      h·V  (output layer, counted even when tied)

A mixture-of-experts layer (E experts of width f_e, top-k) replaces ``3·f·h`` by the router's
``E·h`` (every token is scored against every expert) plus the ``k`` experts the token goes
through, ``k·3·f_e·h`` — the "active" weights, not all E experts' (what MoE MFU is quoted in).
Unbalanced routing changes which rank does the work, not the total.
    + 4 · a·d · s  per layer                QKᵀ scores (2·a·d·s) and the context A·V (2·a·d·s)

The attention term counts all ``s`` keys for every token — no causal halving — which is the
convention of Megatron-LM's FLOPs formula (Narayanan et al. 2021) and PaLM's MFU, so MFU
logged from these numbers compares with published ones.  GQA shrinks only the K/V
projections: the score and context matmuls still run over all ``a`` query heads.  Embedding
look-ups, norms, softmax, RoPE and biases are not counted (they are not matmuls).

Training = forward + backward (2× forward: gradients w.r.t. inputs and weights) = 3×
forward; full activation recompute adds one more forward (hardware FLOPs: MFU in the PaLM
sense leaves recompute out, so callers computing MFU pass ``recompute=False``).  The reference model's
log-probs are one forward.  Generation: the prompt's forward (prefill) plus one forward per
sampled token, each attending to the prompt and the tokens before it.
"""

from __future__ import annotations

from megatron_spin.spec.arch import ModelArch


def matmul_params_per_token(arch: ModelArch) -> int:
    """Weights every token multiplies through: all layers' linears plus the output layer.

    MoE: the router (E·h) and the top-k experts' SwiGLUs (k·3·f_e·h) instead of the dense MLP."""
    h, d, f = arch.hidden_size, arch.head_dim, arch.ffn_hidden_size
    a, g = arch.num_attention_heads, arch.num_kv_heads
    if arch.is_moe:
        mlp = arch.num_experts * h + arch.moe_top_k * 3 * arch.moe_ffn_hidden_size * h
    else:
        mlp = 3 * f * h
    per_layer = (a + 2 * g) * d * h + a * d * h + mlp
    return arch.num_layers * per_layer + h * arch.vocab_size


def attention_flops_per_token(arch: ModelArch, context: float) -> float:
    """Scores and context over ``context`` keys, all layers."""
    return 4.0 * arch.num_layers * arch.num_attention_heads * arch.head_dim * context


def forward_flops_per_token(arch: ModelArch, seq_len: int) -> float:
    """Forward FLOPs per token of a ``seq_len``-token sequence (see the module doc)."""
    return 2.0 * matmul_params_per_token(arch) + attention_flops_per_token(arch, seq_len)


def train_step_flops(arch: ModelArch, tokens: int, seq_len: int, *, recompute: bool, reference: bool) -> float:
    """Model FLOPs of one update over ``tokens`` tokens in sequences of ``seq_len``.

    3 forwards (forward + backward), +1 with full recompute, +1 for the reference log-probs.
    """
    passes = 3 + (1 if recompute else 0) + (1 if reference else 0)
    return passes * tokens * forward_flops_per_token(arch, seq_len)


def generation_flops(arch: ModelArch, prompts: int, prompt_len: int, response_len: int, n: int, *,
                     shared_prefix: bool = True) -> float:
    """Sampling ``n`` responses of ``response_len`` tokens for each of ``prompts`` prompts.

    The prompt is prefilled once per prompt when the engine shares it between the n samples
    (SGLang's radix cache does), else n times.  Sampled token j (0-based) attends to
    ``prompt_len + j + 1`` keys; summed over j that is ``R·P + R(R+1)/2`` keys per sample.
    """
    prefills = prompts * (1 if shared_prefix else n)
    prefill = prefills * prompt_len * forward_flops_per_token(arch, prompt_len)
    samples = prompts * n
    keys = response_len * prompt_len + response_len * (response_len + 1) / 2
    decode = samples * (response_len * 2.0 * matmul_params_per_token(arch) + attention_flops_per_token(arch, keys))
    return prefill + decode


def model_flops_utilization(step_flops: float, step_seconds: float, num_gpus: int, peak_flops_per_gpu: float) -> float:
    """Achieved model FLOP/s over the hardware's peak (dense, the training dtype)."""
    return step_flops / (step_seconds * num_gpus * peak_flops_per_gpu)
