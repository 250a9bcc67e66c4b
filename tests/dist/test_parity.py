"""Megatron (converted checkpoint, any TP/PP) computes what the HF model computes.

All (model, layout) pairs run in one 4-rank launch: layouts smaller than TP·PP = 4 run with
data parallelism over the spare ranks.  Process start-up dominates at this size, so sharing
one launch keeps the matrix cheap.
"""

from __future__ import annotations

import pytest

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.convert.parity import compare, hf_logits, megatron_logits_many, sample_batch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

TOL = 1e-5  # fp32 logits and log-probs (the models issue's acceptance)
LAYOUTS = {
    "tp1": ParallelLayout(1, 1),
    "tp2": ParallelLayout(2, 1),
    "pp2": ParallelLayout(1, 2),
    "tp2pp2": ParallelLayout(2, 2),
    "pp2vpp2": ParallelLayout(1, 2, vpp=2),
}
MODELS = {
    "llama-untied": ("llama", False),
    "llama-tied": ("llama", True),
    "qwen2-untied": ("qwen2", False),
    "qwen2-tied": ("qwen2", True),
    # head_dim 32 != hidden 64 / 4 heads; per-head q/k RMSNorm before RoPE.
    "qwen3-untied": ("qwen3", False),
    "qwen3-tied": ("qwen3", True),
}


@pytest.fixture(scope="module")
def parity(tmp_path_factory):
    """{(model, layout): ParityResult} for every model × layout, from one launch."""
    jobs, refs = [], {}
    for name, (family, tied) in MODELS.items():
        root = tmp_path_factory.mktemp(name)
        # 4 layers so that PP=2 × VPP=2 has one layer per virtual stage.
        hf = make_tiny_hf(root / "hf", family, tied, layers=4)
        convert_hf_to_megatron(hf, root / "mcore", log=lambda *_: None)
        ids = sample_batch(256, batch=2, seq_len=16, seed=len(refs))
        refs[name] = (hf_logits(hf, ids), ids)
        jobs += [(name, lname, (root / "mcore", layout, ids)) for lname, layout in LAYOUTS.items()]
    # 30 layouts in one launch (~30 s here): twice one launch's bound, for a slow shared machine.
    got = megatron_logits_many([j for _, _, j in jobs], world_size=4, timeout=2 * LAUNCH_TIMEOUT)
    return {
        (name, lname): compare(LAYOUTS[lname], refs[name][0], logits, refs[name][1])
        for (name, lname, _), logits in zip(jobs, got)
    }


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("model", list(MODELS))
def test_logit_parity(parity, model, layout):
    r = parity[(model, layout)]
    assert r.max_abs_logit_diff <= TOL, r
    assert r.max_logprob_diff <= TOL, r


def test_parity_detects_a_wrong_weight(parity, tmp_path):
    """The harness is not vacuous: a perturbed checkpoint fails the same tolerance."""
    from safetensors.torch import load_file, save_file

    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=False, layers=2)
    convert_hf_to_megatron(hf, tmp_path / "mcore", log=lambda *_: None)
    weights = load_file(hf / "model.safetensors")
    weights["model.layers.1.mlp.down_proj.weight"][0, 0] += 0.05
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    ids = sample_batch(256, seed=3)
    (got,) = megatron_logits_many([(tmp_path / "mcore", ParallelLayout(1, 1), ids)], timeout=LAUNCH_TIMEOUT)
    r = compare(ParallelLayout(1, 1), hf_logits(hf, ids), got, ids)
    assert r.max_abs_logit_diff > TOL
