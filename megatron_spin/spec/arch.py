"""Architecture description read from a Hugging Face config.

``ModelArch`` is the typed, framework-neutral summary of a decoder-only transformer that the
builder (Megatron side) and the converters (HF side) agree on.  Parsing rejects anything the
builder cannot reproduce exactly, naming the config key, so that a parity failure can never
be the first symptom of an unsupported feature.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Optional


class UnsupportedModelError(ValueError):
    """The HF config describes something megatron_spin cannot build faithfully."""


# HF `architectures[0]` → family.  Mistral-style (no sliding window) is Llama-shaped.
_FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen3_moe": "qwen3_moe"}
_DEFAULT_ARCHITECTURE = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                         "qwen3_moe": "Qwen3MoeForCausalLM"}
# Families whose configs default ``use_sliding_window`` to false (the window size is then ignored).
_SLIDING_WINDOW_OPT_IN = {"qwen2", "qwen3", "qwen3_moe"}
_MOE_FAMILIES = {"qwen3_moe"}

# Megatron-core's Llama-3 RoPE scaling hard-codes these (rotary_pos_embedding._apply_scaling);
# only the factor is a parameter.
_LLAMA3_ROPE_FIXED = {
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclasses.dataclass(frozen=True)
class ModelArch:
    family: str  # "llama" | "qwen2" | "qwen3" | "qwen3_moe"
    hf_architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling_factor: Optional[float]  # Llama-3 style scaling, None when absent
    norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    initializer_range: float = 0.02
    # Qwen3: an RMSNorm over head_dim applied to each query and key head before RoPE.
    qk_layernorm: bool = False
    # Mixture of experts (Qwen3-MoE): every layer's MLP is ``num_experts`` SwiGLU experts of width
    # ``moe_ffn_hidden_size``; a linear router scores them, each token goes to its top
    # ``moe_top_k`` with softmax weights, renormalised over those k when ``moe_norm_topk_prob``.
    # No shared expert.  0 experts: a dense model (``ffn_hidden_size`` is its MLP width).
    num_experts: int = 0
    moe_top_k: int = 0
    moe_ffn_hidden_size: int = 0
    moe_norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.0  # the HF config's load-balancing coefficient (pre-training's)

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_kv_heads

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def _get(cfg: Mapping[str, Any], key: str, source: str) -> Any:
    if key not in cfg or cfg[key] is None:
        raise UnsupportedModelError(f"{source}: required key '{key}' is missing")
    return cfg[key]


def arch_from_hf_config(cfg: Mapping[str, Any], source: str = "config") -> ModelArch:
    """Validate an HF config dict and summarise it.  ``source`` names the file in errors."""
    archs = cfg.get("architectures") or []
    arch_name = archs[0] if archs else None
    family = _FAMILIES.get(arch_name) if arch_name else _MODEL_TYPES.get(cfg.get("model_type"))
    if family is None:
        raise UnsupportedModelError(
            f"{source}: architecture {arch_name or cfg.get('model_type')!r} is not supported "
            f"(supported: {', '.join(sorted(_FAMILIES))})"
        )
    heads = int(_get(cfg, "num_attention_heads", source))
    hidden = int(_get(cfg, "hidden_size", source))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise UnsupportedModelError(
            f"{source}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}"
        )
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{source}: hidden_act={act!r} is not supported (only 'silu')")
    if cfg.get("sliding_window") is not None and cfg.get("use_sliding_window", family not in _SLIDING_WINDOW_OPT_IN):
        raise UnsupportedModelError(
            f"{source}: sliding_window={cfg['sliding_window']} attention is not supported"
        )
    # transformers 5 lists each layer's attention kind; anything but full causal attention
    # (sliding-window layers of Qwen2/Qwen3 above max_window_layers) Megatron would not reproduce.
    other_layers = sorted({t for t in cfg.get("layer_types") or [] if t != "full_attention"})
    if other_layers:
        raise UnsupportedModelError(
            f"{source}: layer_types contains {', '.join(map(repr, other_layers))}; "
            "only 'full_attention' layers are supported"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedModelError(f"{source}: attention_bias / mlp_bias are not supported")
    rope_theta, factor = _rope(cfg, source)
    moe = _moe(cfg, source) if family in _MOE_FAMILIES else {}
    return ModelArch(
        family=family,
        hf_architecture=arch_name or _DEFAULT_ARCHITECTURE[family],
        num_layers=int(_get(cfg, "num_hidden_layers", source)),
        hidden_size=hidden,
        ffn_hidden_size=int(_get(cfg, "intermediate_size", source)),
        num_attention_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(_get(cfg, "vocab_size", source)),
        max_position_embeddings=int(cfg.get("max_position_embeddings") or 4096),
        rope_theta=rope_theta,
        rope_scaling_factor=factor,
        norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qkv_bias=family == "qwen2",
        initializer_range=float(cfg.get("initializer_range") or 0.02),
        qk_layernorm=family in ("qwen3", "qwen3_moe"),
        **moe,
    )


def _moe(cfg: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The MoE fields of a Qwen3-MoE config; refuses what Megatron's MoE layer would not reproduce."""
    # Qwen's published configs say num_experts; transformers 5 writes num_local_experts.
    key = "num_experts" if cfg.get("num_experts") is not None else "num_local_experts"
    experts = int(_get(cfg, key, source))
    top_k = int(_get(cfg, "num_experts_per_tok", source))
    if not 1 <= top_k <= experts:
        raise UnsupportedModelError(f"{source}: num_experts_per_tok={top_k} must be in [1, num_experts={experts}]")
    norm = bool(cfg.get("norm_topk_prob", False))
    if top_k == 1 and norm:
        # HF then weighs the one expert by exactly 1; Megatron's router either keeps the softmax
        # probability (pre-softmax) or refuses top-1 without it: no setting reproduces it.
        raise UnsupportedModelError(f"{source}: num_experts_per_tok=1 with norm_topk_prob=true is not supported "
                                    "(Megatron's router cannot weigh the single expert by 1)")
    # Dense layers between sparse ones (decoder_sparse_step > 1, mlp_only_layers) would need a
    # per-layer spec; the published Qwen3-MoE models have none.
    if int(cfg.get("decoder_sparse_step") or 1) != 1:
        raise UnsupportedModelError(f"{source}: decoder_sparse_step={cfg['decoder_sparse_step']} is not supported "
                                    "(every layer must be a MoE layer: decoder_sparse_step=1)")
    if cfg.get("mlp_only_layers"):
        raise UnsupportedModelError(f"{source}: mlp_only_layers={cfg['mlp_only_layers']} is not supported "
                                    "(dense layers inside a MoE model)")
    if cfg.get("shared_expert_intermediate_size"):
        raise UnsupportedModelError(f"{source}: shared_expert_intermediate_size is not supported (no shared expert)")
    return dict(
        num_experts=experts,
        moe_top_k=top_k,
        moe_ffn_hidden_size=int(_get(cfg, "moe_intermediate_size", source)),
        moe_norm_topk_prob=norm,
        router_aux_loss_coef=float(cfg.get("router_aux_loss_coef") or 0.0),
    )


def _rope(cfg: Mapping[str, Any], source: str) -> tuple[float, Optional[float]]:
    """(rope_theta, llama3 scaling factor or None).  transformers 5 nests both in rope_parameters."""
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    rope_type = merged.get("rope_type", merged.get("type", "default")) or "default"
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise UnsupportedModelError(f"{source}: rope_scaling type {rope_type!r} is not supported")
    for key, want in _LLAMA3_ROPE_FIXED.items():
        if key in merged and float(merged[key]) != float(want):
            raise UnsupportedModelError(
                f"{source}: rope_scaling.{key}={merged[key]} is not supported "
                f"(Megatron-core fixes it at {want})"
            )
    return float(theta), float(_get(merged, "factor", f"{source} rope_scaling"))


def arch_from_hf_dir(hf_dir: str | os.PathLike) -> ModelArch:
    path = os.path.join(os.fspath(hf_dir), "config.json")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError:
        raise UnsupportedModelError(f"{path}: no config.json in the HF model directory") from None
    except json.JSONDecodeError as e:
        raise UnsupportedModelError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from None
    return arch_from_hf_config(cfg, source=path)
