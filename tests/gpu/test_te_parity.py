"""GPU tier: the TransformerEngine layer spec computes what HF computes.

Skipped without CUDA + TransformerEngine.  UNVERIFIED: no GPU has run this file yet.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin import platform
from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.convert.parity import compare, hf_logits, megatron_logits_many, sample_batch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not platform.current().has_te, reason="needs CUDA and TransformerEngine"),
]


@pytest.mark.parametrize("family,tied", [("llama", False), ("qwen2", True), ("qwen3", False), ("qwen3_moe", False)])
def test_te_spec_parity(tmp_path, family, tied):
    hf = make_tiny_hf(tmp_path / "hf", family, tied, layers=4)
    convert_hf_to_megatron(hf, tmp_path / "mcore", log=lambda *_: None)
    ids = sample_batch(256, seed=11)
    ref = hf_logits(hf, ids)
    world = min(2, torch.cuda.device_count())
    layouts = [ParallelLayout(1, 1)] + ([ParallelLayout(2, 1), ParallelLayout(1, 2)] if world == 2 else [])
    if family == "qwen3_moe" and world == 2:
        layouts.append(ParallelLayout(1, 1, ep=2))  # the all-to-all dispatcher over NCCL
    got = megatron_logits_many([(tmp_path / "mcore", lay, ids) for lay in layouts], world_size=world,
                               timeout=LAUNCH_TIMEOUT)
    for lay, logits in zip(layouts, got):
        r = compare(lay, ref, logits, ids)
        # TE kernels use TF32 / fused paths: looser than the CPU tier's 1e-4.
        assert r.max_abs_logit_diff <= 2e-3 and r.max_logprob_diff <= 2e-3, r
