"""The embedded SmolLM2-135M-Instruct: HF → Megatron conversion and logit parity at TP=1 and PP=2."""

from __future__ import annotations

import pytest

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.convert.parity import compare, hf_logits, megatron_logits_many, sample_batch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT

pytestmark = [pytest.mark.dist, pytest.mark.slow, pytest.mark.timeout(900)]


def test_smollm2_parity_tp1_pp2(smollm2_dir, tmp_path):
    mcore = tmp_path / "mcore"
    convert_hf_to_megatron(smollm2_dir, mcore, log=lambda *_: None)
    ids = sample_batch(49152, batch=2, seq_len=24, seed=5)
    ref = hf_logits(smollm2_dir, ids)
    layouts = [ParallelLayout(1, 1), ParallelLayout(1, 2)]
    got = megatron_logits_many([(mcore, lay, ids) for lay in layouts], world_size=2, timeout=LAUNCH_TIMEOUT)
    for lay, logits in zip(layouts, got):
        r = compare(lay, ref, logits, ids)
        assert r.max_abs_logit_diff <= 1e-4 and r.max_logprob_diff <= 1e-4, r
