"""Named, exactly invertible tensor transforms between HF and Megatron layouts.

Megatron fuses Q, K and V into one ``linear_qkv`` whose rows are grouped by KV head:
for each of the ``g`` query groups, its ``h/g`` query heads, then its key head, then its
value head (``[g, h/g + 2, head_dim, ...]``).  Because groups are contiguous, a plain split
of these rows across TP ranks gives each rank whole groups; that is why TP must divide the
number of KV heads.  The SwiGLU MLP fuses ``[gate; up]`` into ``linear_fc1``.  Each transform
only reshapes and concatenates, so HF → Megatron → HF is bit-exact.

The word embedding and output layer are vocabulary-row tables: a model built at a TP that does
not divide the vocabulary holds extra, padded rows (``parallel.layout.padded_vocab_size``).
``VOCAB_ROWS`` drops them on the way to HF, so exports and every weight push carry the true
``[V, hidden]``; the other way it is the identity — the full TP=1 tensor is never padded (TP=1
divides every V), and the checkpoint loader zero-fills the rows a padded model has beyond it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch

from megatron_spin.spec.arch import ModelArch


@dataclasses.dataclass(frozen=True)
class Transform:
    name: str
    to_megatron: Callable[[ModelArch, Sequence[torch.Tensor]], torch.Tensor]
    to_hf: Callable[[ModelArch, torch.Tensor], tuple[torch.Tensor, ...]]
    # How a TP rank's shard of the fused tensor is laid out along the split dimension: as
    # ``tp_blocks`` contiguous blocks, one slice of each fused part.  Megatron splits
    # ``[gate; up]`` part by part, so rank r holds ``[gate_r; up_r]`` (2 blocks); fused QKV is
    # grouped by KV head, so whole groups sit on each rank and a plain concatenation is right.
    tp_blocks: int = 1


def _identity_to_megatron(arch: ModelArch, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    (t,) = hf
    return t


def _identity_to_hf(arch: ModelArch, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (t,)


def _qkv_to_megatron(arch: ModelArch, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    q, k, v = hf  # [h*d, ...], [g*d, ...], [g*d, ...]
    g, hpg, d = arch.num_kv_heads, arch.heads_per_group, arch.head_dim
    rest = q.shape[1:]
    fused = torch.cat(
        [q.reshape(g, hpg, d, *rest), k.reshape(g, 1, d, *rest), v.reshape(g, 1, d, *rest)], dim=1
    )  # [g, hpg + 2, d, ...]
    return fused.reshape(g * (hpg + 2) * d, *rest)


def _qkv_to_hf(arch: ModelArch, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    g, hpg, d = arch.num_kv_heads, arch.heads_per_group, arch.head_dim
    rest = t.shape[1:]
    grouped = t.reshape(g, hpg + 2, d, *rest)
    q, k, v = torch.split(grouped, [hpg, 1, 1], dim=1)
    return (
        q.reshape(g * hpg * d, *rest).contiguous(),
        k.reshape(g * d, *rest).contiguous(),
        v.reshape(g * d, *rest).contiguous(),
    )


def _gate_up_to_megatron(arch: ModelArch, hf: Sequence[torch.Tensor]) -> torch.Tensor:
    gate, up = hf  # [ffn, hidden] each
    return torch.cat([gate, up], dim=0)  # [2*ffn, hidden]


def _gate_up_to_hf(arch: ModelArch, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    gate, up = torch.chunk(t, 2, dim=0)
    return gate.contiguous(), up.contiguous()


def _vocab_rows_to_hf(arch: ModelArch, t: torch.Tensor) -> tuple[torch.Tensor, ...]:
    if t.shape[0] < arch.vocab_size:
        raise ValueError(f"a vocabulary table of {t.shape[0]} rows is smaller than vocab_size={arch.vocab_size}")
    # [V_pad, hidden] -> [V, hidden]; an unpadded tensor passes through untouched (no copy).
    return (t if t.shape[0] == arch.vocab_size else t[: arch.vocab_size].contiguous(),)


IDENTITY = Transform("identity", _identity_to_megatron, _identity_to_hf)
FUSED_QKV = Transform("fused_qkv", _qkv_to_megatron, _qkv_to_hf)
VOCAB_ROWS = Transform("vocab_rows", _identity_to_megatron, _vocab_rows_to_hf)
FUSED_GATE_UP = Transform("fused_gate_up", _gate_up_to_megatron, _gate_up_to_hf, tp_blocks=2)
