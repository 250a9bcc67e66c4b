"""Parallel layout (TP × PP × virtual PP × DP, and EP for mixture-of-experts models) and the start-up rules it must satisfy.

Every rule is checked before any tensor is allocated, and each error names the rule, so a
bad layout costs a second rather than a hang or a silent mismatch on the cluster.

The vocabulary is not a rule: any size runs at any TP.  When TP does not divide it, the
embedding and output layer are padded (:func:`padded_vocab_size`); the padded logits are
masked to -inf inside the model (``models/vocab_padding.py``) and the converter table strips
the padded rows, so neither log-probs nor exported weights ever see them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_spin.spec.arch import ModelArch


# Megatron-LM's ``--make-vocab-size-divisible-by`` default: a padded vocabulary is a multiple
# of 128 x TP, so each rank's shard of the output GEMM stays a multiple of 128 rows.
VOCAB_PAD_MULTIPLE = 128


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary size the Megatron model is built with at tensor parallelism ``tp``.

    Unchanged when ``tp`` divides it: the GEMM shapes, and so every existing checkpoint and
    parity result, stay bit-identical.  Otherwise Megatron-LM's convention: round up to a
    multiple of ``VOCAB_PAD_MULTIPLE * tp`` (e.g. 32001 at TP=2 -> 32256, 16128 rows per rank).
    The smallest multiple of ``tp`` would waste fewer rows (< tp instead of < 128·tp) but leave
    each rank an odd-sized GEMM; padding is needed anyway, so it is made GEMM-friendly.
    """
    if vocab_size % tp == 0:
        return vocab_size
    multiple = VOCAB_PAD_MULTIPLE * tp
    return -(-vocab_size // multiple) * multiple


class LayoutError(ValueError):
    """A parallel layout that cannot hold the model; the message names the violated rule."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline chunks per PP rank (interleaved schedule)
    # Expert parallelism (MoE models): the experts of each layer are split over EP ranks, which are
    # data-parallel ranks of the dense layers (Megatron's "expert folding"): each holds
    # num_experts / EP experts and tokens travel to their experts by all-to-all.  Experts are split
    # across TP like the dense MLP (expert TP = TP).
    ep: int = 1

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp

    @property
    def chunks_per_rank(self) -> int:
        return self.vpp or 1

    def data_parallel_size(self, world_size: int) -> int:
        if world_size % self.model_parallel_size:
            raise LayoutError(
                f"rule world_size % (TP*PP) == 0 violated: world_size={world_size}, "
                f"TP*PP={self.model_parallel_size}"
            )
        dp = world_size // self.model_parallel_size
        if dp % self.ep:
            raise LayoutError(
                f"rule DP % EP == 0 violated: DP={dp} (world_size={world_size}, TP*PP={self.model_parallel_size}), "
                f"EP={self.ep} (expert-parallel ranks are data-parallel ranks of the dense layers)"
            )
        return dp


def validate_layout(arch: ModelArch, layout: ParallelLayout, world_size: Optional[int] = None) -> None:
    """Raise :class:`LayoutError` naming the first rule ``layout`` breaks for ``arch``."""
    tp, pp, vpp, ep = layout.tp, layout.pp, layout.vpp, layout.ep
    if tp < 1 or pp < 1 or ep < 1 or (vpp is not None and vpp < 1):
        raise LayoutError(f"rule TP, PP, EP, VPP >= 1 violated: TP={tp}, PP={pp}, EP={ep}, VPP={vpp}")
    if ep > 1 and not arch.is_moe:
        raise LayoutError(f"rule EP > 1 needs a mixture-of-experts model violated: EP={ep}, "
                          f"{arch.hf_architecture} is dense")
    if arch.is_moe and arch.num_experts % ep:
        raise LayoutError(f"rule num_experts % EP == 0 violated: {arch.num_experts} experts, EP={ep}")
    if arch.is_moe and arch.moe_ffn_hidden_size % tp:
        raise LayoutError(
            f"rule moe_intermediate_size % TP == 0 violated: {arch.moe_ffn_hidden_size}, TP={tp}"
        )
    if arch.num_attention_heads % tp:
        raise LayoutError(
            f"rule num_attention_heads % TP == 0 violated: {arch.num_attention_heads} heads, TP={tp}"
        )
    if arch.num_kv_heads % tp:
        raise LayoutError(
            f"rule num_key_value_heads % TP == 0 violated: {arch.num_kv_heads} KV heads, TP={tp} "
            "(megatron_spin does not replicate KV heads across TP ranks)"
        )
    if not arch.is_moe and arch.ffn_hidden_size % tp:
        raise LayoutError(
            f"rule intermediate_size % TP == 0 violated: {arch.ffn_hidden_size}, TP={tp}"
        )
    if arch.num_layers % pp:
        raise LayoutError(f"rule num_layers % PP == 0 violated: {arch.num_layers} layers, PP={pp}")
    if vpp is not None and vpp > 1:
        if pp < 2:
            raise LayoutError(f"rule VPP > 1 requires PP >= 2 violated: PP={pp}, VPP={vpp}")
        if arch.num_layers % (pp * vpp):
            raise LayoutError(
                f"rule num_layers % (PP*VPP) == 0 violated: {arch.num_layers} layers, PP={pp}, VPP={vpp}"
            )
    if world_size is not None:
        layout.data_parallel_size(world_size)


def check_moe_layout_for_training(arch: ModelArch, layout: ParallelLayout, *, sequence_parallel: bool,
                                  where: str = "this machine") -> None:
    """Refuse to *train* a MoE model at TP > 1 without sequence parallelism.

    Megatron's MoE layer trains with tensor parallelism only under sequence parallelism, and its
    local (non-TE) norms refuse sequence parallelism, so without TransformerEngine (every CPU run)
    expert parallelism, not TP, splits a MoE model.  Forward passes (parity, serving) need neither.
    """
    if arch.is_moe and layout.tp > 1 and not sequence_parallel:
        raise LayoutError(
            f"rule MoE training at TP > 1 needs sequence parallelism violated: TP={layout.tp} on {where} "
            "without TransformerEngine (megatron-core's sequence parallelism needs TE's norms); "
            "use TP=1 and split the experts with EP instead")
