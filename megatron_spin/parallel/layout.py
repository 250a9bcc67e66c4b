"""Parallel layout (TP × PP × virtual PP × DP) and the start-up rules it must satisfy.

Every rule is checked before any tensor is allocated, and each error names the rule, so a
bad layout costs a second rather than a hang or a silent mismatch on the cluster.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from megatron_spin.spec.arch import ModelArch


class LayoutError(ValueError):
    """A parallel layout that cannot hold the model; the message names the violated rule."""


@dataclasses.dataclass(frozen=True)
class ParallelLayout:
    tp: int = 1
    pp: int = 1
    vpp: Optional[int] = None  # virtual pipeline chunks per PP rank (interleaved schedule)

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
        return world_size // self.model_parallel_size


def validate_layout(arch: ModelArch, layout: ParallelLayout, world_size: Optional[int] = None) -> None:
    """Raise :class:`LayoutError` naming the first rule ``layout`` breaks for ``arch``."""
    tp, pp, vpp = layout.tp, layout.pp, layout.vpp
    if tp < 1 or pp < 1 or (vpp is not None and vpp < 1):
        raise LayoutError(f"rule TP, PP, VPP >= 1 violated: TP={tp}, PP={pp}, VPP={vpp}")
    if arch.num_attention_heads % tp:
        raise LayoutError(
            f"rule num_attention_heads % TP == 0 violated: {arch.num_attention_heads} heads, TP={tp}"
        )
    if arch.num_kv_heads % tp:
        raise LayoutError(
            f"rule num_key_value_heads % TP == 0 violated: {arch.num_kv_heads} KV heads, TP={tp} "
            "(megatron_spin does not replicate KV heads across TP ranks)"
        )
    if arch.ffn_hidden_size % tp:
        raise LayoutError(
            f"rule intermediate_size % TP == 0 violated: {arch.ffn_hidden_size}, TP={tp}"
        )
    if arch.vocab_size % tp:
        raise LayoutError(
            f"rule vocab_size % TP == 0 violated: vocab_size={arch.vocab_size}, TP={tp} "
            "(the vocabulary is not padded: padded logits would leak into log-probs)"
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
