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


def layer_terms(arch: ModelArch, s: int, b: int, tp: int, model: ActivationModel = MEGATRON_GPU,
                act_bytes: int = 2) -> dict[str, float]:
    """Bytes one transformer layer saves for one micro-batch ``[s, b]``, by term (module doc)."""
    h, a = arch.hidden_size, arch.num_attention_heads
    if model.paper_dims:
        q, kv, f = h, h, 4 * h
    else:
        q, f = a * arch.head_dim, arch.ffn_hidden_size
        # unfused local attention repeats KV heads up to `a` before its matmuls (module doc)
        kv = arch.num_kv_heads * arch.head_dim if model.flash_attention else q
    sb, B = s * b, act_bytes
    terms = {
        "norm_inputs": 2 * sb * h * B,
        "qkv_fc1_inputs": 2 * sb * h * B,
        "dropout_masks": 2 * sb * h if model.dropout else 0,
        "q_k_v": sb * (q + 2 * kv) * B / tp,
        "proj_input": sb * q * B / tp,
        "mlp": sb * (3 if model.gated_mlp else 2) * f * B / tp,
    }
    if model.flash_attention:
        terms["attention"] = 4 * a * sb / tp  # fp32 log-sum-exp
    else:
        scores = a * s * sb  # a·s²·b elements
        terms["attention"] = (scores * B + (scores * (1 + B) if model.dropout else 0)) / tp
    return terms


def layer_bytes(arch: ModelArch, s: int, b: int, tp: int, model: ActivationModel = MEGATRON_GPU,
                act_bytes: int = 2) -> float:
    return sum(layer_terms(arch, s, b, tp, model, act_bytes).values())


def checkpoint_bytes(arch: ModelArch, s: int, b: int, act_bytes: int = 2) -> float:
    """Full recompute: the layer input, kept per layer (replicated over TP without SP)."""
    return s * b * arch.hidden_size * act_bytes


def output_bytes(arch: ModelArch, s: int, b: int, tp: int, act_bytes: int = 2) -> float:
    """Last stage, per micro-batch: final-norm and output-layer inputs, fp32 logits for the loss."""
    return 2 * s * b * arch.hidden_size * act_bytes + 4 * s * b * padded_vocab_size(arch.vocab_size, tp) / tp


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

    @property
    def total(self) -> float:
        return self.stored + self.working + self.output


def stage_activations(arch: ModelArch, *, s: int, b: int, tp: int, pp: int, vpp: int, stage: int,
                      micro_batches: int, recompute: bool, model: ActivationModel = MEGATRON_GPU,
                      act_bytes: int = 2) -> StageActivations:
    layers = in_flight_layers(arch.num_layers, pp, vpp, stage, micro_batches)
    full = layer_bytes(arch, s, b, tp, model, act_bytes)
    per_layer = checkpoint_bytes(arch, s, b, act_bytes) if recompute else full
    output = output_bytes(arch, s, b, tp, act_bytes) if stage == pp - 1 else 0.0
    return StageActivations(stored=layers * per_layer, working=full if recompute else 0.0, output=output)
