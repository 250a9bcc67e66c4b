"""Shared fixtures: tiny random HF models of each supported family, written to disk."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Bounded launches: every multi-process test passes this to parallel.launch.
LAUNCH_TIMEOUT = float(os.environ.get("MEGATRON_SPIN_TEST_LAUNCH_TIMEOUT", "300"))


def send_json(handler, status: int, payload) -> None:
    """Answer a stdlib ``BaseHTTPRequestHandler`` request with ``payload`` as JSON (test servers)."""
    import json

    data = json.dumps(payload).encode()
    handler.send_response(status)
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(data)))
    handler.end_headers()
    handler.wfile.write(data)


def make_arch(**overrides):
    """A ModelArch without an HF config (GQA: 8 heads, 4 KV heads), fields overridable."""
    from megatron_spin.spec.arch import ModelArch

    base = dict(
        family="llama", hf_architecture="LlamaForCausalLM", num_layers=8, hidden_size=64,
        ffn_hidden_size=96, num_attention_heads=8, num_kv_heads=4, head_dim=8, vocab_size=256,
        max_position_embeddings=128, rope_theta=10000.0, rope_scaling_factor=None, norm_eps=1e-5,
        tie_word_embeddings=False, qkv_bias=False,
    )
    return ModelArch(**{**base, **overrides})


def make_tiny_hf(out: Path, family: str = "llama", tied: bool = False, layers: int = 2, seed: int = 0,
                 vocab_size: int = 256, hidden_size: int = 64, dtype: torch.dtype = torch.float32,
                 kv_heads: int = 2, head_dim: int | None = None, experts: int = 4, top_k: int = 2) -> Path:
    """A random HF model with GQA (4 heads, 2 KV heads) saved as safetensors (head_dim = hidden/4).
    ``kv_heads=4`` makes it multi-head (TP=4 needs 4 KV heads).  Qwen3 defaults to
    head_dim = hidden/2, so that a builder assuming hidden/heads would fail.  ``qwen3_moe``: Qwen3's
    attention and ``experts`` SwiGLU experts of width hidden*3/4 per layer, top-``top_k`` routing
    with renormalised weights (the published Qwen3-MoE settings)."""
    from transformers import (LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    torch.manual_seed(seed)
    common = dict(
        hidden_size=hidden_size, intermediate_size=hidden_size * 3 // 2, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=kv_heads, vocab_size=vocab_size, max_position_embeddings=128,
        tie_word_embeddings=tied, rms_norm_eps=1e-5,
    )
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(rope_theta=10000.0, **common))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(rope_theta=1000000.0, **common))
    elif family == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(rope_theta=1000000.0, head_dim=head_dim or hidden_size // 2, **common))
    elif family == "qwen3_moe":
        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            rope_theta=1000000.0, head_dim=head_dim or hidden_size // 2, num_experts=experts,
            num_experts_per_tok=top_k, moe_intermediate_size=hidden_size * 3 // 4, norm_topk_prob=True,
            decoder_sparse_step=1, mlp_only_layers=[], router_aux_loss_coef=0.001, **common))
    else:
        raise ValueError(family)
    # HF initialises norms to 1 and biases to 0: perturb them so a dropped or swapped
    # norm/bias cannot pass a parity test by accident.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def spin_cache(tmp_path_factory) -> Path:
    """One ``MEGATRON_SPIN_CACHE`` root for the session's runs and benchmarks: the packaged model is
    materialised into it once (``smollm2_dir``) and a model a run converts is converted once, on
    first use (what a user's cache does between runs), instead of once per test."""
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def smollm2_dir(spin_cache) -> Path:
    """The packaged SmolLM2-135M-Instruct materialised once per test session, where
    ``packaged:smollm2`` finds it under ``spin_cache``."""
    from megatron_spin.packaged import smollm2

    return smollm2.materialize_smollm2(spin_cache / smollm2.default_dir().name)
