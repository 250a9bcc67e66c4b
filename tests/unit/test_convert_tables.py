"""Converter tables and transforms: exact invertibility, the fused-QKV layout Megatron expects,
TE-name canonicalisation, coverage of real HF state_dicts and a bit-exact round trip."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

from megatron_spin.convert import ConverterTable, Param, canonical_name, converter_for
from megatron_spin.convert.llama import LLAMA
from megatron_spin.convert.qwen2 import QWEN2
from megatron_spin.convert.qwen3 import QWEN3
from megatron_spin.convert.table import COLUMN, REPLICATED, ROW
from megatron_spin.convert.transforms import FUSED_GATE_UP, FUSED_QKV, IDENTITY, VOCAB_ROWS
from megatron_spin.parallel.layout import padded_vocab_size
from megatron_spin.spec.arch import ModelArch, arch_from_hf_config
from tests.conftest import make_arch as tiny_arch


def make_arch(**kw) -> ModelArch:
    small = dict(num_layers=2, hidden_size=16, ffn_hidden_size=24, num_attention_heads=4,
                 num_kv_heads=2, head_dim=4, vocab_size=32, max_position_embeddings=64)
    return tiny_arch(**{**small, **kw})


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def test_vocab_rows_unpadded_is_the_tensor_itself():
    t = torch.randn(32, 16)
    assert VOCAB_ROWS.to_megatron(make_arch(), [t]) is t
    (back,) = VOCAB_ROWS.to_hf(make_arch(), t)
    assert back is t  # divisible vocabularies: nothing copied, nothing changed


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("tp", [2, 4])
def test_padded_vocab_tables_export_the_true_shape(tp, tied):
    """TP shards of a padded embedding / output layer merge and convert to HF's ``[V, h]``, bit-exact."""
    arch = make_arch(vocab_size=33, tie_word_embeddings=tied)  # 33 = 32 tokens + one added
    padded = padded_vocab_size(33, tp)
    assert padded > 33
    names = ["embedding.word_embeddings.weight"] + ([] if tied else ["output_layer.weight"])
    assert {p.megatron for p in LLAMA.params(arch) if p.rule.transform is VOCAB_ROWS} == set(names)
    for name in names:
        param = LLAMA.param(name)
        hf = torch.randn(33, 16)
        full = torch.cat([LLAMA.to_megatron(arch, param, lambda _: hf), torch.zeros(padded - 33, 16)])
        shards = list(torch.chunk(full, tp, dim=param.rule.tp_dim))
        assert LLAMA.full_shape(param, shards[0].shape, tp) == (padded, 16)
        (out,) = LLAMA.to_hf(arch, param, LLAMA.merge_tp_shards(param, shards)).values()
        assert _bits_equal(out, hf) and out.is_contiguous()


def test_vocab_rows_refuse_a_short_table():
    with pytest.raises(ValueError, match="smaller than vocab_size=33"):
        VOCAB_ROWS.to_hf(make_arch(vocab_size=33), torch.zeros(32, 16))


# ---------------------------------------------------------------------------------------------
# transforms


def test_qkv_tiny_layout_hand_built():
    # 4 heads, 2 KV heads, head_dim 1: rows must be [q0, q1, k0, v0, q2, q3, k1, v1].
    arch = make_arch(num_attention_heads=4, num_kv_heads=2, head_dim=1, hidden_size=3)
    q = torch.tensor([[0.0, 0, 0], [1, 1, 1], [2, 2, 2], [3, 3, 3]])  # q_i rows = i
    k = torch.tensor([[10.0, 10, 10], [11, 11, 11]])  # k_j rows = 10 + j
    v = torch.tensor([[20.0, 20, 20], [21, 21, 21]])  # v_j rows = 20 + j
    fused = FUSED_QKV.to_megatron(arch, [q, k, v])
    assert fused.shape == (8, 3)
    assert fused[:, 0].tolist() == [0, 1, 10, 20, 2, 3, 11, 21]
    assert torch.equal(fused[:, 0:1].expand(8, 3), fused)  # rows moved whole


def test_qkv_tiny_layout_head_dim_2_bias():
    # head_dim 2, 1-D bias: each head is a block of 2 contiguous entries.
    arch = make_arch(num_attention_heads=4, num_kv_heads=2, head_dim=2)
    q = torch.arange(8.0)  # q0=[0,1] q1=[2,3] q2=[4,5] q3=[6,7]
    k = torch.arange(100.0, 104.0)  # k0=[100,101] k1=[102,103]
    v = torch.arange(200.0, 204.0)
    fused = FUSED_QKV.to_megatron(arch, [q, k, v])
    assert fused.tolist() == [0, 1, 2, 3, 100, 101, 200, 201, 4, 5, 6, 7, 102, 103, 202, 203]


def test_qkv_mha_and_mqa_layouts():
    mha = make_arch(num_attention_heads=2, num_kv_heads=2, head_dim=1)
    fused = FUSED_QKV.to_megatron(mha, [torch.tensor([0.0, 1]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])])
    assert fused.tolist() == [0, 10, 20, 1, 11, 21]
    mqa = make_arch(num_attention_heads=3, num_kv_heads=1, head_dim=1)
    fused = FUSED_QKV.to_megatron(mqa, [torch.tensor([0.0, 1, 2]), torch.tensor([10.0]), torch.tensor([20.0])])
    assert fused.tolist() == [0, 1, 2, 10, 20]


def test_qkv_tp_split_gives_whole_groups():
    # A contiguous split across TP=2 gives rank r exactly KV group r (why TP | num_kv_heads).
    arch = make_arch(num_attention_heads=4, num_kv_heads=2, head_dim=1)
    fused = FUSED_QKV.to_megatron(arch, [torch.arange(4.0), torch.arange(10.0, 12), torch.arange(20.0, 22)])
    rank0, rank1 = torch.chunk(fused, 2)
    assert rank0.tolist() == [0, 1, 10, 20]
    assert rank1.tolist() == [2, 3, 11, 21]


@pytest.mark.parametrize("heads,kv,d", [(4, 2, 4), (8, 8, 2), (6, 1, 3), (9, 3, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_qkv_weight_and_bias_round_trip_bit_exact(heads, kv, d, dtype):
    gen = torch.Generator().manual_seed(heads * 100 + kv * 10 + d)
    arch = make_arch(num_attention_heads=heads, num_kv_heads=kv, head_dim=d, hidden_size=11)
    q = torch.randn(heads * d, 11, generator=gen).to(dtype)
    k = torch.randn(kv * d, 11, generator=gen).to(dtype)
    v = torch.randn(kv * d, 11, generator=gen).to(dtype)
    fused = FUSED_QKV.to_megatron(arch, [q, k, v])
    assert fused.shape == ((heads + 2 * kv) * d, 11)
    back = FUSED_QKV.to_hf(arch, fused)
    assert len(back) == 3
    for orig, got in zip((q, k, v), back):
        assert _bits_equal(orig, got)
        assert got.is_contiguous()
    # and Megatron → HF → Megatron
    assert _bits_equal(FUSED_QKV.to_megatron(arch, list(back)), fused)

    bq, bk, bv = (torch.randn(n * d, generator=gen).to(dtype) for n in (heads, kv, kv))
    fused_b = FUSED_QKV.to_megatron(arch, [bq, bk, bv])
    assert fused_b.shape == ((heads + 2 * kv) * d,)
    for orig, got in zip((bq, bk, bv), FUSED_QKV.to_hf(arch, fused_b)):
        assert _bits_equal(orig, got)


def test_qkv_weight_and_bias_use_the_same_row_order():
    # Row i of the fused weight and entry i of the fused bias belong to the same output unit.
    arch = make_arch(num_attention_heads=6, num_kv_heads=2, head_dim=3, hidden_size=5)
    q, k, v = torch.randn(18, 5), torch.randn(6, 5), torch.randn(6, 5)
    w = FUSED_QKV.to_megatron(arch, [q, k, v])
    b = FUSED_QKV.to_megatron(arch, [q[:, 2].clone(), k[:, 2].clone(), v[:, 2].clone()])
    assert torch.equal(w[:, 2], b)


def test_qkv_rejects_wrong_shapes():
    arch = make_arch(num_attention_heads=4, num_kv_heads=2, head_dim=4)
    with pytest.raises(RuntimeError):
        FUSED_QKV.to_megatron(arch, [torch.zeros(16, 8), torch.zeros(4, 8), torch.zeros(8, 8)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gate_up_round_trip_bit_exact(dtype):
    arch = make_arch()
    gen = torch.Generator().manual_seed(7)
    gate = torch.randn(24, 16, generator=gen).to(dtype)
    up = torch.randn(24, 16, generator=gen).to(dtype)
    fused = FUSED_GATE_UP.to_megatron(arch, [gate, up])
    assert fused.shape == (48, 16)
    assert torch.equal(fused[:24], gate) and torch.equal(fused[24:], up)  # [gate; up]
    g2, u2 = FUSED_GATE_UP.to_hf(arch, fused)
    assert _bits_equal(g2, gate) and _bits_equal(u2, up)
    assert g2.is_contiguous() and u2.is_contiguous()


def test_identity_round_trip():
    t = torch.randn(3, 4)
    (back,) = IDENTITY.to_hf(make_arch(), IDENTITY.to_megatron(make_arch(), [t]))
    assert _bits_equal(back, t)


# ---------------------------------------------------------------------------------------------
# canonical_name


@pytest.mark.parametrize(
    "name,want",
    [
        ("decoder.layers.3.self_attention.linear_qkv.layer_norm_weight", "decoder.layers.3.input_layernorm.weight"),
        ("decoder.layers.0.mlp.linear_fc1.layer_norm_weight", "decoder.layers.0.pre_mlp_layernorm.weight"),
        ("module.decoder.layers.12.mlp.linear_fc1.layer_norm_weight", "decoder.layers.12.pre_mlp_layernorm.weight"),
        ("module.embedding.word_embeddings.weight", "embedding.word_embeddings.weight"),
        ("decoder.layers.1.self_attention.linear_qkv.weight", "decoder.layers.1.self_attention.linear_qkv.weight"),
        ("decoder.layers.1.mlp.linear_fc1.weight", "decoder.layers.1.mlp.linear_fc1.weight"),
        ("output_layer.weight", "output_layer.weight"),
    ],
)
def test_canonical_name(name, want):
    assert canonical_name(name) == want


def test_param_lookup_accepts_te_and_ddp_names():
    p = LLAMA.param("module.decoder.layers.5.self_attention.linear_qkv.layer_norm_weight")
    assert p.megatron == "decoder.layers.5.input_layernorm.weight"
    assert p.hf == ("model.layers.5.input_layernorm.weight",)
    assert p.layer == 5
    p = LLAMA.param("decoder.layers.7.mlp.linear_fc1.layer_norm_weight")
    assert p.hf == ("model.layers.7.post_attention_layernorm.weight",)


# ---------------------------------------------------------------------------------------------
# tables vs real HF models


def tiny_hf(family: str, tied: bool):
    common = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    if family == "llama":
        cfg = LlamaConfig(**common)
        model = LlamaForCausalLM(cfg)
    elif family == "qwen2":
        cfg = Qwen2Config(**common)
        model = Qwen2ForCausalLM(cfg)
    else:  # head_dim 16 != hidden 32 / 4 heads
        cfg = Qwen3Config(head_dim=16, **common)
        model = Qwen3ForCausalLM(cfg)
    with torch.no_grad():  # biases start at zero and norms at one: make every tensor distinct
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return arch_from_hf_config(cfg.to_dict()), model.state_dict()


CASES = [("llama", False), ("llama", True), ("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True)]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{'tied' if t else 'untied'}" for f, t in CASES])
def hf_model(request):
    return tiny_hf(*request.param)


def test_converter_for_family():
    assert converter_for(make_arch(family="llama")) is LLAMA
    assert converter_for(make_arch(family="qwen2", qkv_bias=True)) is QWEN2
    assert converter_for(make_arch(family="qwen3", qk_layernorm=True)) is QWEN3
    assert isinstance(LLAMA, ConverterTable)


def test_table_covers_hf_state_dict_exactly(hf_model):
    arch, sd = hf_model
    table = converter_for(arch)
    names = table.hf_names(arch)
    assert len(names) == len(set(names)), "an HF tensor is claimed by two Megatron params"
    expected = set(sd)
    if arch.tie_word_embeddings:
        # HF's state_dict lists the tied head as an alias of the embedding; there is no
        # separate tensor to convert.
        assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()
        expected.discard("lm_head.weight")
    assert set(names) == expected


def test_tied_has_no_output_layer(hf_model):
    arch, _ = hf_model
    megatron = [p.megatron for p in converter_for(arch).params(arch)]
    hf = converter_for(arch).hf_names(arch)
    assert ("output_layer.weight" in megatron) is (not arch.tie_word_embeddings)
    assert ("lm_head.weight" in hf) is (not arch.tie_word_embeddings)


def test_params_order_and_layers(hf_model):
    arch, _ = hf_model
    params = list(converter_for(arch).params(arch))
    assert params[0].megatron == "embedding.word_embeddings.weight"
    per_layer = [p for p in params if p.layer is not None]
    per_kind = 6 + (1 if arch.qkv_bias else 0) + (2 if arch.qk_layernorm else 0)
    assert len(per_layer) == arch.num_layers * per_kind
    assert sorted({p.layer for p in per_layer}) == list(range(arch.num_layers))
    for p in per_layer:
        assert f"decoder.layers.{p.layer}." in p.megatron
        assert all(h.startswith(f"model.layers.{p.layer}.") for h in p.hf)
    has_bias = any(p.megatron.endswith("linear_qkv.bias") for p in params)
    assert has_bias is (arch.family == "qwen2")
    has_qk_norm = any(p.megatron.endswith("q_layernorm.weight") for p in params)
    assert has_qk_norm is (arch.family == "qwen3")


def test_tp_dims():
    arch = make_arch(family="qwen2", qkv_bias=True)
    dims = {p.megatron.replace("decoder.layers.0.", ""): p.rule.tp_dim
            for p in QWEN2.params(arch) if p.layer in (0, None)}
    assert dims == {
        "embedding.word_embeddings.weight": COLUMN,
        "input_layernorm.weight": REPLICATED,
        "self_attention.linear_qkv.weight": COLUMN,
        "self_attention.linear_qkv.bias": COLUMN,
        "self_attention.linear_proj.weight": ROW,
        "pre_mlp_layernorm.weight": REPLICATED,
        "mlp.linear_fc1.weight": COLUMN,
        "mlp.linear_fc2.weight": ROW,
        "decoder.final_layernorm.weight": REPLICATED,
        "output_layer.weight": COLUMN,
    }


def test_qwen3_qk_norms_are_replicated_per_head_vectors():
    """q_norm/k_norm map one-to-one onto Megatron's q/k_layernorm, whole on every TP rank."""
    arch = make_arch(family="qwen3", qk_layernorm=True, head_dim=16)
    for x in "qk":
        p = QWEN3.param(f"decoder.layers.2.self_attention.{x}_layernorm.weight")
        assert p.hf == (f"model.layers.2.self_attn.{x}_norm.weight",)
        assert p.rule.tp_dim is REPLICATED and p.rule.transform is IDENTITY
        with pytest.raises(KeyError):
            QWEN2.param(f"decoder.layers.2.self_attention.{x}_layernorm.weight")
    assert not any(p.megatron.endswith("linear_qkv.bias") for p in QWEN3.params(arch))


def test_param_lookup_round_trips_every_name(hf_model):
    arch, _ = hf_model
    table = converter_for(arch)
    for p in table.params(arch):
        got = table.param(p.megatron)
        assert isinstance(got, Param)
        assert (got.megatron, got.hf, got.layer, got.rule) == (p.megatron, p.hf, p.layer, p.rule)


@pytest.mark.parametrize(
    "name",
    [
        "decoder.layers.0.self_attention.core_attention.weight",
        "decoder.layers.x.input_layernorm.weight",
        "decoder.layers.0.input_layernorm.weight.extra",
        "embedding.position_embeddings.weight",
    ],
)
def test_param_unknown_name_raises_key_error(name):
    with pytest.raises(KeyError) as info:
        LLAMA.param(name)
    assert name in str(info.value)
    assert "llama" in str(info.value)


def test_llama_table_has_no_qkv_bias_rule():
    with pytest.raises(KeyError, match="linear_qkv.bias"):
        LLAMA.param("decoder.layers.0.self_attention.linear_qkv.bias")
    assert QWEN2.param("decoder.layers.0.self_attention.linear_qkv.bias").hf == tuple(
        f"model.layers.0.self_attn.{x}_proj.bias" for x in "qkv")


def test_full_round_trip_bit_exact(hf_model):
    arch, sd = hf_model
    table = converter_for(arch)
    reads: list[str] = []

    def read(name: str) -> torch.Tensor:
        reads.append(name)
        return sd[name]

    megatron = {p.megatron: table.to_megatron(arch, p, read) for p in table.params(arch)}
    assert sorted(reads) == sorted(table.hf_names(arch))  # each HF tensor read exactly once

    # Shapes Megatron expects for the full (TP=1) model.
    h, g, d = arch.num_attention_heads, arch.num_kv_heads, arch.head_dim
    assert megatron["decoder.layers.0.self_attention.linear_qkv.weight"].shape == ((h + 2 * g) * d, arch.hidden_size)
    assert megatron["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * arch.ffn_hidden_size, arch.hidden_size)
    if arch.qkv_bias:
        assert megatron["decoder.layers.2.self_attention.linear_qkv.bias"].shape == ((h + 2 * g) * d,)

    back: dict[str, torch.Tensor] = {}
    for name, tensor in megatron.items():
        out = table.to_hf(arch, table.param(name), tensor)
        assert not set(out) & set(back)
        back.update(out)
    expected = {k for k in sd if not (arch.tie_word_embeddings and k == "lm_head.weight")}
    assert set(back) == expected
    for k in expected:
        assert _bits_equal(back[k], sd[k]), k


def test_fused_qkv_is_grouped_not_concatenated(hf_model):
    """With GQA the fused rows interleave K/V per group: a plain [q; k; v] concat would differ."""
    arch, sd = hf_model
    p = converter_for(arch).param("decoder.layers.1.self_attention.linear_qkv.weight")
    fused = converter_for(arch).to_megatron(arch, p, sd.__getitem__)
    q, k, v = (sd[f"model.layers.1.self_attn.{x}_proj.weight"] for x in "qkv")
    assert not torch.equal(fused, torch.cat([q, k, v]))
    group = arch.heads_per_group * arch.head_dim
    assert torch.equal(fused[:group], q[:group])
    assert torch.equal(fused[group:group + arch.head_dim], k[: arch.head_dim])


def test_to_hf_rejects_wrong_part_count():
    arch = make_arch()
    bad = dataclasses.replace(LLAMA.param("decoder.layers.0.mlp.linear_fc2.weight"),
                              hf=("a", "b"))
    with pytest.raises(ValueError):
        LLAMA.to_hf(arch, bad, torch.zeros(16, 24))
