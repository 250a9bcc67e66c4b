"""validate_layout: every start-up rule is enforced, and its error names the rule."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_spin.spec.arch import ModelArch
from megatron_spin.parallel.layout import (
    VOCAB_PAD_MULTIPLE,
    LayoutError,
    ParallelLayout,
    padded_vocab_size,
    validate_layout,
)
from tests.conftest import make_arch

# SmolLM2-135M (DESIGN.md): 30 layers, hidden 576, 9 heads, 3 KV heads, vocab 49152.
SMOLLM2 = make_arch(
    num_layers=30, hidden_size=576, ffn_hidden_size=1536, num_attention_heads=9, num_kv_heads=3,
    head_dim=64, vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
)


@pytest.mark.parametrize(
    "tp,pp,vpp,world",
    [
        (1, 1, None, None),
        (1, 1, 1, None),  # VPP=1 is the plain schedule
        (2, 1, None, 2),
        (4, 1, None, 8),
        (2, 2, None, 4),
        (1, 2, 2, 2),
        (1, 4, 2, 4),
        (2, 2, 2, 8),
        (1, 8, None, 8),
    ],
)
def test_valid_layouts_pass(tp, pp, vpp, world):
    layout = ParallelLayout(tp, pp, vpp)
    assert validate_layout(make_arch(), layout, world_size=world) is None
    if world is not None:
        assert layout.data_parallel_size(world) == world // (tp * pp)


def _violates(arch: ModelArch, layout: ParallelLayout, rule: str, world_size=None) -> str:
    with pytest.raises(LayoutError) as info:
        validate_layout(arch, layout, world_size=world_size)
    msg = str(info.value)
    assert rule in msg, f"{rule!r} not in {msg!r}"
    return msg


def test_heads_rule():
    # 6 heads, 6 KV heads: TP=4 breaks the heads rule first.
    msg = _violates(make_arch(num_attention_heads=6, num_kv_heads=6), ParallelLayout(tp=4),
                    "num_attention_heads % TP")
    assert "6" in msg and "TP=4" in msg


def test_kv_heads_rule():
    # 8 heads divisible by TP=4, but 2 KV heads are not: no KV replication.
    msg = _violates(make_arch(num_kv_heads=2), ParallelLayout(tp=4), "num_key_value_heads % TP")
    assert "2 KV heads" in msg


def test_intermediate_size_rule():
    _violates(make_arch(ffn_hidden_size=90), ParallelLayout(tp=4), "intermediate_size % TP")


def test_any_vocab_at_any_tp():
    # 32,000 tokens plus one added special token: padded, not refused.
    for tp in (1, 2, 4):
        validate_layout(make_arch(vocab_size=32001), ParallelLayout(tp=tp))


@pytest.mark.parametrize("vocab,tp,padded", [
    (32000, 1, 32000), (32000, 2, 32000), (32000, 4, 32000),  # divisible: unchanged (bit-identical GEMMs)
    (49152, 3, 49152), (151936, 8, 151936),
    (32001, 1, 32001),                                        # TP=1 divides everything
    (32001, 2, 32256), (32001, 4, 32256), (32001, 8, 32768),  # Megatron-LM: multiple of 128·TP
    (250, 4, 512), (257, 2, 512), (7, 3, 384),
])
def test_padded_vocab_size(vocab, tp, padded):
    got = padded_vocab_size(vocab, tp)
    assert got == padded
    assert got >= vocab and got % tp == 0
    if vocab % tp:
        assert (got // tp) % VOCAB_PAD_MULTIPLE == 0  # each rank's shard stays GEMM-aligned


def test_layers_pp_rule():
    msg = _violates(make_arch(num_layers=6), ParallelLayout(pp=4), "num_layers % PP")
    assert "6 layers" in msg and "PP=4" in msg


def test_layers_pp_vpp_rule():
    # 6 layers split over PP=2 is fine, but not into 2*2 virtual chunks.
    _violates(make_arch(num_layers=6), ParallelLayout(pp=2, vpp=2), "num_layers % (PP*VPP)")


def test_vpp_requires_pp():
    _violates(make_arch(), ParallelLayout(pp=1, vpp=2), "VPP > 1 requires PP >= 2")


def test_world_size_rule():
    msg = _violates(make_arch(), ParallelLayout(tp=2, pp=2), "world_size % (TP*PP)", world_size=6)
    assert "world_size=6" in msg


def test_world_size_rule_on_data_parallel_size():
    with pytest.raises(LayoutError, match=r"world_size % \(TP\*PP\)"):
        ParallelLayout(tp=2, pp=2).data_parallel_size(2)


@pytest.mark.parametrize("layout", [ParallelLayout(tp=0), ParallelLayout(pp=0), ParallelLayout(vpp=0)])
def test_non_positive_sizes(layout):
    _violates(make_arch(), layout, "TP, PP, EP, VPP >= 1")


def test_layout_properties():
    layout = ParallelLayout(tp=2, pp=4, vpp=3)
    assert layout.model_parallel_size == 8
    assert layout.chunks_per_rank == 3
    assert ParallelLayout().chunks_per_rank == 1
    assert layout.data_parallel_size(16) == 2


def test_smollm2_tp3_ok():
    validate_layout(SMOLLM2, ParallelLayout(tp=3), world_size=3)
    validate_layout(SMOLLM2, ParallelLayout(tp=3, pp=2), world_size=6)
    validate_layout(SMOLLM2, ParallelLayout(tp=1, pp=3, vpp=2))  # 30 % 6 == 0


def test_smollm2_tp2_rejected():
    _violates(SMOLLM2, ParallelLayout(tp=2), "num_attention_heads % TP")


def test_smollm2_pp4_rejected():
    _violates(SMOLLM2, ParallelLayout(pp=4), "num_layers % PP")


def test_smollm2_kv_rule_when_heads_divide():
    # Hypothetical 12-head variant of the same shape: heads divide by TP=4, 3 KV heads do not.
    _violates(dataclasses.replace(SMOLLM2, num_attention_heads=12), ParallelLayout(tp=4),
              "num_key_value_heads % TP")
