"""arch_from_hf_config / arch_from_hf_dir: fields read from real transformers configs, and
every rejection names the offending config key."""

from __future__ import annotations

import json

import pytest
from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

from megatron_spin.spec.arch import ModelArch, UnsupportedModelError, arch_from_hf_config, arch_from_hf_dir

SHAPE = dict(
    vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
)
LLAMA3_ROPE = dict(
    rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
    original_max_position_embeddings=8192, rope_theta=500000.0,
)


def llama(**kw) -> dict:
    return LlamaConfig(**{**SHAPE, **kw}).to_dict()


# ---------------------------------------------------------------------------------------------
# accepted configs


def test_llama_fields():
    arch = arch_from_hf_config(llama(rms_norm_eps=1e-5, initializer_range=0.01))
    assert isinstance(arch, ModelArch)
    assert arch.family == "llama"
    assert arch.hf_architecture == "LlamaForCausalLM"
    assert arch.num_layers == 3
    assert arch.hidden_size == 32
    assert arch.ffn_hidden_size == 48
    assert arch.num_attention_heads == 4
    assert arch.num_kv_heads == 2
    assert arch.heads_per_group == 2
    assert arch.head_dim == 8  # hidden // heads
    assert arch.vocab_size == 96
    assert arch.max_position_embeddings == 128
    assert arch.rope_theta == 10000.0
    assert arch.rope_scaling_factor is None
    assert arch.norm_eps == 1e-5
    assert arch.initializer_range == 0.01
    assert arch.tie_word_embeddings is False
    assert arch.qkv_bias is False


def test_llama_tied_and_explicit_head_dim():
    arch = arch_from_hf_config(llama(tie_word_embeddings=True, head_dim=16))
    assert arch.tie_word_embeddings is True
    assert arch.head_dim == 16  # explicit head_dim wins over hidden // heads (= 8)


def test_mha_when_kv_heads_equal_heads():
    arch = arch_from_hf_config(llama(num_key_value_heads=4))
    assert arch.num_kv_heads == 4
    assert arch.heads_per_group == 1


def test_architectures_list_takes_precedence():
    cfg = llama()
    cfg["architectures"] = ["LlamaForCausalLM"]
    assert arch_from_hf_config(cfg).hf_architecture == "LlamaForCausalLM"


def test_qwen2_fields():
    cfg = Qwen2Config(**SHAPE, rope_theta=1000000.0, tie_word_embeddings=True).to_dict()
    arch = arch_from_hf_config(cfg)
    assert arch.family == "qwen2"
    assert arch.hf_architecture == "Qwen2ForCausalLM"
    assert arch.qkv_bias is True
    assert arch.rope_theta == 1000000.0
    assert arch.tie_word_embeddings is True
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 8)


def test_qwen3_fields():
    # head_dim 16 != hidden 32 / 4 heads: Qwen3 states it explicitly.
    cfg = Qwen3Config(**SHAPE, head_dim=16, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True).to_dict()
    arch = arch_from_hf_config(cfg)
    assert (arch.family, arch.hf_architecture) == ("qwen3", "Qwen3ForCausalLM")
    assert arch.qk_layernorm is True and arch.qkv_bias is False
    assert (arch.num_attention_heads, arch.num_kv_heads, arch.head_dim) == (4, 2, 16)
    assert (arch.rope_theta, arch.norm_eps, arch.tie_word_embeddings) == (1000000.0, 1e-6, True)
    assert arch_from_hf_config(Qwen3Config(**SHAPE, tie_word_embeddings=False).to_dict()).tie_word_embeddings is False


def test_qk_layernorm_only_for_qwen3():
    assert arch_from_hf_config(llama()).qk_layernorm is False
    assert arch_from_hf_config(Qwen2Config(**SHAPE).to_dict()).qk_layernorm is False


def test_qwen2_sliding_window_ignored_when_not_used():
    # HF only applies Qwen2's sliding window when use_sliding_window is true.
    cfg = Qwen2Config(**SHAPE).to_dict()
    cfg["sliding_window"], cfg["use_sliding_window"] = 64, False
    assert arch_from_hf_config(cfg).family == "qwen2"


def test_mistral_without_sliding_window_is_llama_shaped():
    cfg = MistralConfig(**SHAPE, sliding_window=None, head_dim=16).to_dict()
    arch = arch_from_hf_config(cfg)
    assert arch.family == "llama"
    assert arch.qkv_bias is False
    assert arch.head_dim == 16
    assert (arch.num_attention_heads, arch.num_kv_heads) == (4, 2)


def test_llama3_rope_scaling_factor():
    cfg = llama(max_position_embeddings=16384, rope_parameters=dict(LLAMA3_ROPE))
    arch = arch_from_hf_config(cfg)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling_factor == 8.0


def test_llama3_rope_scaling_transformers4_style():
    # transformers 4 configs keep rope_theta top-level and the scaling in rope_scaling.
    cfg = llama()
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"] = 500000.0
    cfg["rope_scaling"] = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"} | {"factor": 32.0}
    arch = arch_from_hf_config(cfg)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling_factor == 32.0


# ---------------------------------------------------------------------------------------------
# rejected configs: UnsupportedModelError naming the key


def _rejects(cfg: dict, *needles: str, source: str = "config") -> str:
    with pytest.raises(UnsupportedModelError) as info:
        arch_from_hf_config(cfg, source=source)
    msg = str(info.value)
    for needle in needles:
        assert needle in msg, f"{needle!r} not in {msg!r}"
    return msg


def test_rejects_unsupported_architecture_by_model_type():
    _rejects(GPT2Config().to_dict(), "gpt2", "not supported")


def test_rejects_unsupported_architecture_by_architectures_list():
    cfg = llama()
    cfg["architectures"] = ["LlamaForSequenceClassification"]
    _rejects(cfg, "LlamaForSequenceClassification", "not supported")


def test_rejects_non_silu_activation():
    _rejects(llama(hidden_act="gelu"), "hidden_act", "gelu")


def test_rejects_mistral_sliding_window():
    cfg = MistralConfig(**SHAPE, sliding_window=4096).to_dict()
    _rejects(cfg, "sliding_window", "4096")


def test_rejects_qwen2_with_sliding_window_enabled():
    cfg = Qwen2Config(**SHAPE, use_sliding_window=True, sliding_window=64).to_dict()
    _rejects(cfg, "sliding_window")


def test_rejects_qwen3_with_sliding_window_enabled():
    cfg = Qwen3Config(**SHAPE, use_sliding_window=True, sliding_window=64).to_dict()
    _rejects(cfg, "sliding_window", "64")


def test_rejects_sliding_attention_layers():
    cfg = Qwen3Config(**SHAPE).to_dict()
    cfg["layer_types"] = ["full_attention", "sliding_attention", "full_attention"]
    _rejects(cfg, "layer_types", "sliding_attention")


def test_rejects_qwen3_attention_bias():
    _rejects(Qwen3Config(**SHAPE, attention_bias=True).to_dict(), "attention_bias")


def test_rejects_attention_bias():
    _rejects(llama(attention_bias=True), "attention_bias")


def test_rejects_mlp_bias():
    _rejects(llama(mlp_bias=True), "mlp_bias")


def test_rejects_yarn_rope():
    cfg = llama(
        max_position_embeddings=8192,
        rope_parameters=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=2048,
                             rope_theta=10000.0),
    )
    _rejects(cfg, "rope_scaling", "yarn")


@pytest.mark.parametrize(
    "key,value",
    [("low_freq_factor", 2.0), ("high_freq_factor", 8.0), ("original_max_position_embeddings", 4096)],
)
def test_rejects_llama3_rope_with_non_default_fixed_parameter(key, value):
    cfg = llama(max_position_embeddings=16384, rope_parameters=dict(LLAMA3_ROPE))
    cfg["rope_parameters"][key] = value
    _rejects(cfg, f"rope_scaling.{key}", str(value))


def test_rejects_llama3_rope_without_factor():
    cfg = llama(max_position_embeddings=16384, rope_parameters=dict(LLAMA3_ROPE))
    del cfg["rope_parameters"]["factor"]
    _rejects(cfg, "factor")


def test_rejects_heads_not_multiple_of_kv_heads():
    cfg = llama()
    cfg["num_key_value_heads"] = 3
    _rejects(cfg, "num_attention_heads=4", "num_key_value_heads=3")


@pytest.mark.parametrize("key", ["num_hidden_layers", "vocab_size", "intermediate_size", "hidden_size"])
def test_rejects_missing_required_key(key):
    cfg = llama()
    del cfg[key]
    _rejects(cfg, key)


def test_error_names_the_source():
    _rejects(llama(hidden_act="relu"), "/some/model/config.json", source="/some/model/config.json")


# ---------------------------------------------------------------------------------------------
# arch_from_hf_dir


def test_from_dir_reads_config_json(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama(tie_word_embeddings=True)))
    arch = arch_from_hf_dir(tmp_path)
    assert arch == arch_from_hf_config(llama(tie_word_embeddings=True))


def test_from_dir_rejection_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(llama(hidden_act="gelu")))
    with pytest.raises(UnsupportedModelError, match="hidden_act") as info:
        arch_from_hf_dir(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)


def test_from_missing_dir_names_the_path(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(UnsupportedModelError) as info:
        arch_from_hf_dir(missing)
    assert str(missing / "config.json") in str(info.value)


def test_from_dir_invalid_json_names_path_and_line(tmp_path):
    (tmp_path / "config.json").write_text('{\n  "model_type": "llama",\n  "hidden_size": ,\n}\n')
    with pytest.raises(UnsupportedModelError) as info:
        arch_from_hf_dir(tmp_path)
    msg = str(info.value)
    assert str(tmp_path / "config.json") in msg
    assert "line 3" in msg


# ---------------------------------------------------------------------------------------------
# Qwen3-MoE


def qwen3_moe(**kw) -> dict:
    from transformers import Qwen3MoeConfig

    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=24, norm_topk_prob=True,
               decoder_sparse_step=1, mlp_only_layers=[])
    return Qwen3MoeConfig(**{**SHAPE, **moe, **kw}).to_dict()


def test_qwen3_moe_fields_from_a_transformers_config():
    # transformers 5 writes num_experts as num_local_experts; Qwen's published configs say num_experts.
    arch = arch_from_hf_config(qwen3_moe(router_aux_loss_coef=0.001))
    assert (arch.family, arch.hf_architecture, arch.is_moe) == ("qwen3_moe", "Qwen3MoeForCausalLM", True)
    assert (arch.num_experts, arch.moe_top_k, arch.moe_ffn_hidden_size, arch.moe_norm_topk_prob) == (8, 2, 24, True)
    assert arch.qk_layernorm and arch.router_aux_loss_coef == 0.001
    published = {k: v for k, v in qwen3_moe().items() if k != "num_local_experts"} | {"num_experts": 8}
    assert arch_from_hf_config(published).num_experts == 8
    assert not arch_from_hf_config(llama()).is_moe


@pytest.mark.parametrize("kw,needles", [
    (dict(decoder_sparse_step=2), ("decoder_sparse_step=2",)),
    (dict(mlp_only_layers=[1]), ("mlp_only_layers=[1]",)),
    (dict(num_experts_per_tok=9), ("num_experts_per_tok=9", "num_experts=8")),
    (dict(num_experts_per_tok=1), ("num_experts_per_tok=1 with norm_topk_prob=true",)),
])
def test_rejects_moe_configs_megatron_would_not_reproduce(kw, needles):
    _rejects(qwen3_moe(**kw), *needles)


def test_top1_without_renormalisation_is_accepted():
    assert arch_from_hf_config(qwen3_moe(num_experts_per_tok=1, norm_topk_prob=False)).moe_top_k == 1
