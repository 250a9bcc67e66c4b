"""A GPU without TransformerEngine (or megatron's fused-softmax kernels) builds a model that runs.

The pip wheel of megatron-core ships neither TE nor the masked-softmax CUDA kernels; asking
for ``masked_softmax_fusion`` then fails at the first bf16 forward (the kernel import), and
``persist_layer_norm`` makes the local spec's torch RMSNorm refuse to build.  The config is
built here for such a platform (a GPU platform record; nothing runs on a GPU) and the model
is instantiated from it on the meta device.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin import platform
from megatron_spin.models.builder import build_layer_spec, build_transformer_config
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.precision import Precision

ARCH = ModelArch(
    family="llama", hf_architecture="LlamaForCausalLM", num_layers=2, hidden_size=64, ffn_hidden_size=96,
    num_attention_heads=4, num_kv_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=64,
    rope_theta=10000.0, rope_scaling_factor=None, norm_eps=1e-5, tie_word_embeddings=False, qkv_bias=False,
)
GPU_NO_TE = platform.Platform(device="cuda", backend="nccl", has_te=False, has_fused_softmax=False)
GPU_KERNELS = platform.Platform(device="cuda", backend="nccl", has_te=False, has_fused_softmax=True)


@pytest.fixture(autouse=True)
def megatron_on_cpu():
    platform.prepare_megatron()


def test_fused_softmax_only_when_its_kernels_import():
    assert not build_transformer_config(ARCH, ParallelLayout(), Precision("bfloat16"), plat=GPU_NO_TE).masked_softmax_fusion
    assert build_transformer_config(ARCH, ParallelLayout(), Precision("bfloat16"), plat=GPU_KERNELS).masked_softmax_fusion


def _build_on_meta(rank, world_size):
    from megatron.core.models.gpt import GPTModel

    from megatron_spin.parallel.groups import init_parallel

    init_parallel(ParallelLayout())
    config = build_transformer_config(ARCH, ParallelLayout(), Precision("bfloat16"), plat=GPU_NO_TE)
    with torch.device("meta"):
        model = GPTModel(config=config, transformer_layer_spec=build_layer_spec(GPU_NO_TE), vocab_size=ARCH.vocab_size,
                         max_sequence_length=ARCH.max_position_embeddings, position_embedding_type="rope")
    return config.persist_layer_norm, sum(p.numel() for p in model.parameters())


def test_the_local_spec_model_builds_from_a_gpu_config_without_te():
    from megatron_spin.parallel.launch import launch

    ((persist, params),) = launch(_build_on_meta, 1, timeout=120)
    assert not persist and params > 0


def test_te_counts_only_when_it_imports(monkeypatch):
    assert platform._imports("torch") and not platform._imports("transformer_engine.pytorch")
    assert not platform._imports("scaled_masked_softmax_cuda")
