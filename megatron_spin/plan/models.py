"""Architectures the planner knows by name, and how ``--model`` / a preset picks one.

The table holds the published Hugging Face ``config.json`` fields (only those
:func:`arch_from_hf_config` reads), so a named model goes through exactly the parsing a
downloaded checkpoint would.  Values checked against the public configs of
meta-llama/Meta-Llama-3-8B and Meta-Llama-3-70B (untied embeddings, RoPE base 500000,
8192 positions, no rope_scaling), of HuggingFaceTB/SmolLM2-135M-Instruct (the packaged
CPU model; tied embeddings) and of Qwen/Qwen3-30B-A3B (mixture of experts: 128 experts of
768, top 8 renormalised, no shared expert, every layer sparse; head_dim 128 ≠ 2048/32;
untied; 30.5 B parameters, 3.3 B activated, as its model card says).
"""

from __future__ import annotations

import json
import os
from typing import Optional

from megatron_spin.spec.arch import ModelArch, arch_from_hf_config, arch_from_hf_dir

_LLAMA3_COMMON = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_act": "silu",
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
}

PUBLISHED: dict[str, dict] = {
    "llama3-8b": {**_LLAMA3_COMMON, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                  "num_key_value_heads": 8, "intermediate_size": 14336},
    "llama3-70b": {**_LLAMA3_COMMON, "hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64,
                   "num_key_value_heads": 8, "intermediate_size": 28672},
    "smollm2-135m": {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                     "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                     "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152,
                     "max_position_embeddings": 8192, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True},
    "qwen3-30b-a3b": {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_act": "silu",
                      "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32,
                      "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 6144,
                      "num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                      "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [],
                      "router_aux_loss_coef": 0.001, "vocab_size": 151936, "max_position_embeddings": 40960,
                      "rope_theta": 1000000.0, "rms_norm_eps": 1e-6, "use_sliding_window": False,
                      "sliding_window": None, "tie_word_embeddings": False, "attention_bias": False},
}

# Preset name → the model it is written for (used unless --model is given).
PRESET_MODELS = {"spin_70b": "llama3-70b", "spin_8b": "llama3-8b", "spin_trainer": "smollm2-135m"}


class ModelNotFoundError(ValueError):
    pass


def published_arch(name: str) -> ModelArch:
    if name not in PUBLISHED:
        raise ModelNotFoundError(f"--model {name!r}: not a path and not a known name (known: {sorted(PUBLISHED)})")
    return arch_from_hf_config(PUBLISHED[name], source=f"published config {name}")


def arch_from_path(path: str) -> ModelArch:
    """An HF model directory, or a ``config.json`` file."""
    if os.path.isdir(path):
        return arch_from_hf_dir(path)
    with open(path) as f:
        return arch_from_hf_config(json.load(f), source=path)


def resolve_model(model: Optional[str], preset: str, model_path: Optional[str]) -> tuple[ModelArch, str]:
    """(arch, where it came from): ``--model`` first, then the preset's model, then its model.path."""
    if model:
        if os.path.exists(model):
            return arch_from_path(model), model
        return published_arch(model), model
    if preset in PRESET_MODELS:
        name = PRESET_MODELS[preset]
        return published_arch(name), f"{name} (preset {preset})"
    if model_path == "packaged:smollm2":
        return published_arch("smollm2-135m"), "smollm2-135m (actor_rollout_ref.model.path=packaged:smollm2)"
    if model_path and os.path.exists(model_path):
        return arch_from_path(model_path), model_path
    raise ModelNotFoundError(
        f"preset {preset!r} names no known model and actor_rollout_ref.model.path={model_path!r} is not readable; "
        f"pass --model (a config.json, an HF model directory or one of {sorted(PUBLISHED)})")
