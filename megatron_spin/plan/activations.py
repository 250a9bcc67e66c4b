"""Activation memory of training, after Korthikanti et al. 2022 ("Reducing Activation
Recomputation in Large Transformer Models"), adjusted for Llama-shaped models.

The paper's GPT layer (MHA, LayerNorm, 4h GELU MLP, dropout, unfused attention) saves, per
layer and micro-batch of ``b`` sequences of ``s`` tokens with 16-bit activations and tensor
parallelism ``t`` without sequence parallelism::

    s·b·h·(10 + 24/t + 5·a·s/(h·t))  bytes          (t = 1: s·b·h·(34 + 5·a·s/h))

    replicated over TP (every TP rank holds the full [s, b, h]):
        2 norm inputs 4sbh, the QKV and fc1 inputs 4sbh, 2 dropout masks (1 byte) 2sbh  = 10sbh
    split over TP:
        Q, K, V 6sbh, output-projection input 2sbh, GELU input and output 2·8sbh           = 24sbh/t
        softmax output 2as²b, its dropout mask as²b, dropout output 2as²b                 = 5as²b/t

What changes for the models megatron_spin trains (``MEGATRON_GPU``, the GPU layer spec):

* GQA with ``g`` KV heads of size ``d``: the flash/fused attention kernel saves K and V at
  their own width, ``2·s·b·g·d`` bytes each instead of ``2sbh``.  (Megatron's *unfused*
  local attention repeats the KV heads up to ``a`` before its batched matmuls, so there the
  saved K and V have the full query width and GQA saves nothing: the ``PAPER`` case.)
  Q and the projection input keep the query width ``q = a·d``.
* SwiGLU with FFN size ``f``: fc1 produces gate and up (``2f``), both saved by the fused
  SwiGLU, plus its output ``f`` (the fc2 input): ``2·3f·s·b/t`` bytes instead of the
  GELU MLP's ``2·2f·s·b/t`` (= 16sbh/t at f = 4h).
* Flash attention never materialises the ``a·s²`` scores: the ``5as²b`` term becomes the
  fp32 log-sum-exp per head and row, ``4·a·s·b/t``; its output is the projection input
  already counted.
* No dropout (the trainer sets hidden and attention dropout to 0): no masks.
* RMSNorm instead of LayerNorm: the same saved input (the fp32 per-row statistics are
  ignored, as the paper ignores LayerNorm's).

So a Llama layer saves ``s·b·(8h + (4q + 4g·d + 6f + 4a)/t)`` bytes at 16 bits.  Full
recompute (Megatron ``recompute_granularity=full``, uniform, one layer per checkpoint) keeps
only each layer's input, ``2sbh``, and rebuilds one layer at a time in the backward: one
layer's full activations of one micro-batch are live on top.

The last pipeline stage also keeps the final-norm and output-layer inputs (``2sbh`` each)
and the fp32 logits that Megatron's vocab-parallel cross entropy keeps for its backward
(``4·s·b·V/t``), for the one micro-batch it is working on.

Pipeline schedule: with 1F1B, stage ``i`` of ``p`` holds ``min(p - i, M)`` micro-batches of
its ``L/p`` layers (the first stage: ``p``, i.e. the whole model's worth of one micro-batch).
Interleaved with ``v`` chunks, Megatron warms up ``2(p - i - 1) + (v - 1)p`` chunk
micro-batches, so ``min(2(p - i - 1) + (v - 1)p + 1, M·v)`` chunks of ``L/(p·v)`` layers are
held — at the first stage ``L·(1 + (p - 1)/(p·v))`` layers' worth, the paper's figure.
Activations of ``fp32`` runs are 4 bytes instead of 2 (masks stay 1 byte).

Mixture of experts (E experts of width ``f_e``, top-``k``, Megatron's all-to-all dispatcher,
one SequentialMLP per expert; ``MEGATRON_GPU`` only — ``PAPER`` keeps the paper's dense GPT):

* Each token is routed ``k`` times, so the expert MLPs see ``k·s·b`` tokens: the SwiGLU terms
  become ``2·3·f_e·k·s·b/t`` and each expert's fc1 saves its input, ``2·k·s·b·h`` — not split
  over TP, because the dispatcher all-gathers the tokens over TP before the experts (expert
  TP = TP) and every TP rank computes its slice of f_e for all of them.  The count assumes
  balanced routing (no capacity factor: an overloaded rank holds more, nothing is dropped).
* The router saves its input (the pre-MLP norm output, in place of the dense fc1 input) and
  roughly one fp32 ``[s·b, E]`` score tensor plus the int64 permutation indices of the
  ``k`` routes: ``s·b·(4E + 8k)`` bytes, small next to the hidden-size terms.
* Dispatch buffers: while a MoE layer runs, the all-to-all and TP all-gather outputs and the
  experts' output before the combine are live beside the saved tensors — about two
  ``[k·s·b, h]`` buffers, ``2·2·k·s·b·h`` bytes of working memory for one layer of one
  micro-batch (transient: counted once per stage, like the recompute working layer).
* Megatron trains a MoE model at TP > 1 only with sequence parallelism (the trainer's
  builder switches it on), which splits every term that is replicated over TP without it
  (norm, QKV and router inputs, the recompute checkpoints, the last stage's hidden-size
  inputs) by ``t``, as in Korthikanti et al.'s SP case (``s·b·h·34/t`` for their GPT).
  Dense models train without it.
"""

from __future__ import annotations

import dataclasses

from megatron_spin.parallel.layout import padded_vocab_size
from megatron_spin.spec.arch import ModelArch


@dataclasses.dataclass(frozen=True)
class ActivationModel:
    """What the kernels save for the backward (see the module doc)."""

    name: str
    gated_mlp: bool  # SwiGLU (gate and up) rather than a 4h GELU MLP
    flash_attention: bool  # fused attention: no s² scores, K/V saved at their GQA width
    dropout: bool  # dropout masks after attention, the projection and fc2
    paper_dims: bool  # the paper's GPT: MHA, q = h and f = 4h whatever the arch says


MEGATRON_GPU = ActivationModel("megatron-gpu", gated_mlp=True, flash_attention=True, dropout=False, paper_dims=False)
PAPER = ActivationModel("paper", gated_mlp=False, flash_attention=False, dropout=True, paper_dims=True)
MODELS = {m.name: m for m in (MEGATRON_GPU, PAPER)}


def sequence_parallel(arch: ModelArch, tp: int, model: ActivationModel = MEGATRON_GPU) -> bool:
    """Whether the trainer runs with sequence parallelism: MoE models at TP > 1 (module doc)."""
    return arch.is_moe and tp > 1 and not model.paper_dims


def layer_terms(arch: ModelArch, s: int, b: int, tp: int, model: ActivationModel = MEGATRON_GPU,
                act_bytes: int = 2) -> dict[str, float]:
    """Bytes one transformer layer saves for one micro-batch ``[s, b]``, by term (module doc)."""
    h, a = arch.hidden_size, arch.num_attention_heads
    moe = arch.is_moe and not model.paper_dims
    if model.paper_dims:
        q, kv, f = h, h, 4 * h
    else:
        q, f = a * arch.head_dim, arch.ffn_hidden_size
        # unfused local attention repeats KV heads up to `a` before its matmuls (module doc)
        kv = arch.num_kv_heads * arch.head_dim if model.flash_attention else q
    rep = tp if sequence_parallel(arch, tp, model) else 1  # what "replicated over TP" is split by
    sb, B = s * b, act_bytes
    terms = {
        "norm_inputs": 2 * sb * h * B / rep,
        "qkv_fc1_inputs": 2 * sb * h * B / rep,  # MoE: the QKV and router inputs
        "dropout_masks": 2 * sb * h / rep if model.dropout else 0,
        "q_k_v": sb * (q + 2 * kv) * B / tp,
        "proj_input": sb * q * B / tp,
    }
    if moe:
        k, fe = arch.moe_top_k, arch.moe_ffn_hidden_size
        terms["mlp"] = k * sb * 3 * fe * B / tp  # gate, up (fused weighted SwiGLU), fc2 input
        terms["expert_inputs"] = k * sb * h * B  # all-gathered over TP: every TP rank holds all k·s·b tokens
        terms["router"] = sb * (4 * arch.num_experts + 8 * k) / rep  # fp32 scores, int64 route indices
    else:
        terms["mlp"] = sb * (3 if model.gated_mlp else 2) * f * B / tp
    if model.flash_attention:
        terms["attention"] = 4 * a * sb / tp  # fp32 log-sum-exp
    else:
        scores = a * s * sb  # a·s²·b elements
        terms["attention"] = (scores * B + (scores * (1 + B) if model.dropout else 0)) / tp
    return terms


def layer_bytes(arch: ModelArch, s: int, b: int, tp: int, model: ActivationModel = MEGATRON_GPU,
                act_bytes: int = 2) -> float:
    return sum(layer_terms(arch, s, b, tp, model, act_bytes).values())


def checkpoint_bytes(arch: ModelArch, s: int, b: int, act_bytes: int = 2, tp: int = 1,
                     model: ActivationModel = MEGATRON_GPU) -> float:
    """Full recompute: the layer input, kept per layer (replicated over TP without SP, split with it)."""
    rep = tp if sequence_parallel(arch, tp, model) else 1
    return s * b * arch.hidden_size * act_bytes / rep


def output_bytes(arch: ModelArch, s: int, b: int, tp: int, act_bytes: int = 2,
                 model: ActivationModel = MEGATRON_GPU) -> float:
    """Last stage, per micro-batch: final-norm and output-layer inputs, fp32 logits for the loss."""
    rep = tp if sequence_parallel(arch, tp, model) else 1  # SP: the output layer saves its local shard
    return 2 * s * b * arch.hidden_size * act_bytes / rep + 4 * s * b * padded_vocab_size(arch.vocab_size, tp) / tp


def dispatch_bytes(arch: ModelArch, s: int, b: int, act_bytes: int = 2,
                   model: ActivationModel = MEGATRON_GPU) -> float:
    """MoE working memory of one layer and micro-batch: two ``[k·s·b, h]`` dispatch buffers (module doc)."""
    if not arch.is_moe or model.paper_dims:
        return 0.0
    return 2 * arch.moe_top_k * s * b * arch.hidden_size * act_bytes


def in_flight_layers(num_layers: int, pp: int, vpp: int, stage: int, micro_batches: int) -> float:
    """Layers' worth of one micro-batch's activations stage ``stage`` holds at its peak."""
    m = max(1, micro_batches)
    if vpp <= 1:
        return min(pp - stage, m) * num_layers / pp
    chunks = min(2 * (pp - stage - 1) + (vpp - 1) * pp + 1, m * vpp)
    return chunks * num_layers / (pp * vpp)


@dataclasses.dataclass(frozen=True)
class StageActivations:
    stored: float  # saved for the backward over the in-flight micro-batches
    working: float  # recompute: one rebuilt layer of one micro-batch (0 without recompute)
    output: float  # last stage: logits & co. of its one in-flight micro-batch
    dispatch: float = 0.0  # MoE: all-to-all buffers of the layer running (0 for a dense model)

    @property
    def total(self) -> float:
        return self.stored + self.working + self.output + self.dispatch


def stage_activations(arch: ModelArch, *, s: int, b: int, tp: int, pp: int, vpp: int, stage: int,
                      micro_batches: int, recompute: bool, model: ActivationModel = MEGATRON_GPU,
                      act_bytes: int = 2) -> StageActivations:
    layers = in_flight_layers(arch.num_layers, pp, vpp, stage, micro_batches)
    full = layer_bytes(arch, s, b, tp, model, act_bytes)
    per_layer = checkpoint_bytes(arch, s, b, act_bytes, tp, model) if recompute else full
    output = output_bytes(arch, s, b, tp, act_bytes, model) if stage == pp - 1 else 0.0
    return StageActivations(stored=layers * per_layer, working=full if recompute else 0.0, output=output,
                            dispatch=dispatch_bytes(arch, s, b, act_bytes, model))
