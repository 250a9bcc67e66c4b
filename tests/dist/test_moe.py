"""Qwen3-MoE on Megatron's MoE layer: logit parity with HF at TP, PP and EP, a bit-exact round
trip through the converter, and an update that does not depend on the layout (EP included).

Expert parallelism runs for real on gloo ranks: Megatron's all-to-all token dispatcher moves
each token to the rank holding its experts (``all_to_all_single`` with uneven splits) and back,
in the forward and the backward.  Layouts smaller than the 4-rank world run with data
parallelism over the spare ranks; EP ranks are data-parallel ranks of the dense layers.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from megatron_spin.convert.parity import compare, hf_logits, megatron_logits_many, sample_batch
from megatron_spin.convert.pipeline import convert_hf_to_megatron, convert_megatron_to_hf
from megatron_spin.loss.config import LossConfig
from megatron_spin.pairs import collate_pairs
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from megatron_spin.train.config import BatchConfig, OptimConfig
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf
from tests.dist.test_train_step import _read_weights, synthetic_pairs

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

TOL = 1e-5  # fp32 logits (the acceptance)
LAYOUTS = {
    "tp1": ParallelLayout(1, 1),
    "ep2": ParallelLayout(1, 1, ep=2),
    "ep4": ParallelLayout(1, 1, ep=4),
    "tp2": ParallelLayout(2, 1),
    "tp2_ep2": ParallelLayout(2, 1, ep=2),
    "pp2_ep2": ParallelLayout(1, 2, ep=2),
}


@pytest.fixture(scope="module")
def moe(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    hf = make_tiny_hf(root / "hf", "qwen3_moe", tied=False, layers=2)
    convert_hf_to_megatron(hf, root / "mcore", log=lambda *_: None)
    return hf, root / "mcore"


@pytest.fixture(scope="module")
def parity(moe):
    hf, mcore = moe
    ids = sample_batch(256, batch=2, seq_len=16, seed=5)
    ref = hf_logits(hf, ids)
    got = megatron_logits_many([(mcore, layout, ids) for layout in LAYOUTS.values()], world_size=4,
                               timeout=LAUNCH_TIMEOUT)
    return {name: compare(layout, ref, g, ids) for (name, layout), g in zip(LAYOUTS.items(), got)}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_logit_parity(parity, layout):
    r = parity[layout]
    assert r.max_abs_logit_diff <= TOL, r
    assert r.max_logprob_diff <= TOL, r


def test_parity_detects_a_wrong_expert(moe, tmp_path):
    """One perturbed weight of one expert (the last, held by EP rank 1 at EP=2) fails parity: the
    experts on the far side of the all-to-all are the ones computing."""
    hf, _ = moe
    bad = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tied=False, layers=2)
    weights = load_file(bad / "model.safetensors")
    weights["model.layers.1.mlp.experts.3.down_proj.weight"] += 0.05
    save_file(weights, bad / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_megatron(bad, tmp_path / "mcore", log=lambda *_: None)
    ids = sample_batch(256, batch=2, seq_len=16, seed=5)
    (got,) = megatron_logits_many([(tmp_path / "mcore", ParallelLayout(1, 1, ep=2), ids)], timeout=LAUNCH_TIMEOUT)
    assert compare(ParallelLayout(1, 1, ep=2), hf_logits(hf, ids), got, ids).max_abs_logit_diff > 1e-3


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)


def test_roundtrip_is_bit_exact_in_bf16(tmp_path):
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", tied=False, layers=2)
    weights = {k: v.to(torch.bfloat16) for k, v in load_file(hf / "model.safetensors").items()}
    save_file(weights, hf / "model.safetensors", metadata={"format": "pt"})
    convert_hf_to_megatron(hf, tmp_path / "m", layout=ParallelLayout(1, 1, ep=2), log=lambda *_: None)
    convert_megatron_to_hf(tmp_path / "m", tmp_path / "back", log=lambda *_: None)
    back = load_file(tmp_path / "back" / "model.safetensors")
    assert back.keys() == weights.keys()
    assert sum(".mlp.experts." in k for k in back) == 2 * 4 * 3  # layers x experts x (gate, up, down)
    for name, t in weights.items():
        assert back[name].dtype == t.dtype and torch.equal(_bits(back[name]), _bits(t)), name


def _train_jobs(rank, world_size, ckpt, jobs, batch, out_root):
    """For each (name, layout, optim, aux coefficient): 2 updates from ``ckpt``, save the weights."""
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import save_model_weights
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    results = {}
    for name, layout, optim, aux in jobs:
        pctx = init_parallel(layout)
        actor = Actor.build(arch, pctx, optim, LossConfig(beta=0.5), init_from=ckpt, moe_aux_loss_coeff=aux)
        ref = Reference.build(arch, pctx, init_from=ckpt)
        mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, 1), pctx.dp_rank, pctx.dp_size)
        ref_logps = ref.logps(mbs)
        history = [actor.train_step(mbs, ref_logps) for _ in range(2)]
        save_model_weights(actor.modules, f"{out_root}/{name}")
        if pctx.is_last_stage and pctx.tp_rank == 0 and pctx.dp_rank == 0:
            results[name] = history
        destroy_parallel()
    return results


def test_update_is_layout_independent(moe, tmp_path):
    """Two DPO updates give the same weights at EP=1, 2, 4, with PP and the distributed
    optimizer.  An expert's gradient sums over the tokens every EP rank routed to it (the
    all-to-all's backward), then is averaged over expert-data-parallel ranks only; an error in
    either scaling changes the experts' step by a factor EP.  The load-balancing loss, when on,
    moves the router differently from the preference loss alone, and equally at every EP."""
    _, ckpt = moe
    sgd = OptimConfig(optimizer="sgd", lr=0.05, clip_grad=1.0)
    adam = OptimConfig(optimizer="adam", lr=1e-3, adam_eps=1e-2, clip_grad=1.0, use_distributed_optimizer=True)
    jobs = [
        ("tp1_dp4", ParallelLayout(1, 1), sgd, 0.0),
        ("ep2_dp4", ParallelLayout(1, 1, ep=2), sgd, 0.0),
        ("ep4_dp4", ParallelLayout(1, 1, ep=4), sgd, 0.0),
        ("pp2_ep2", ParallelLayout(1, 2, ep=2), sgd, 0.0),
        ("distopt_tp1", ParallelLayout(1, 1), adam, 0.0),
        ("distopt_ep2", ParallelLayout(1, 1, ep=2), adam, 0.0),
        ("aux_tp1", ParallelLayout(1, 1), sgd, 0.5),
        ("aux_ep2", ParallelLayout(1, 1, ep=2), sgd, 0.5),
    ]
    batch = collate_pairs(synthetic_pairs(4, seed=0), pad_id=0)
    per_rank = launch(_train_jobs, 4, (str(ckpt), jobs, batch, str(tmp_path)), timeout=LAUNCH_TIMEOUT)
    metrics = {k: v for r in per_rank for k, v in r.items()}
    names = [j[0] for j in jobs]
    (weights,) = launch(_read_weights, 1, ([str(tmp_path / n) for n in names] + [str(ckpt)], str(ckpt)),
                        timeout=LAUNCH_TIMEOUT)
    *trained, before = weights
    weights = dict(zip(names, trained))
    for name in names:
        assert metrics[name][0]["loss"] == pytest.approx(math.log(2), abs=1e-6), name
    for base, others in (("tp1_dp4", names[1:4]), ("distopt_tp1", ["distopt_ep2"]), ("aux_tp1", ["aux_ep2"])):
        for name in others:
            for step in range(2):
                for key in ("loss", "grad_norm", "reward_margin"):
                    assert metrics[name][step][key] == pytest.approx(metrics[base][step][key], rel=1e-5, abs=1e-6), \
                        (name, step, key)
            for pname, w in weights[base].items():
                torch.testing.assert_close(weights[name][pname], w, rtol=0, atol=2e-6, msg=f"{name}: {pname}")
    # Every expert moved by 10x the tolerance above (else equality would be vacuous there): a
    # gradient scaled by EP or 1/EP would miss by at least half the step.
    for e in range(4):
        fc2 = f"decoder.layers.1.mlp.experts.local_experts.{e}.linear_fc2.weight"
        assert (weights["tp1_dp4"][fc2] - before[fc2]).abs().max() > 2e-5, fc2
    # The auxiliary loss changed the router's update.
    router = "decoder.layers.0.mlp.router.weight"
    assert (weights["aux_tp1"][router] - weights["tp1_dp4"][router]).abs().max() > 1e-4


def test_training_at_tp2_is_refused_without_sequence_parallelism():
    """Megatron trains MoE at TP > 1 only with sequence parallelism, which needs TE's norms: on this
    platform the actor refuses before building anything, naming the rule and the way out (EP)."""
    from megatron_spin.models.builder import check_moe_training
    from megatron_spin.parallel.layout import LayoutError
    from megatron_spin.platform import Platform
    from megatron_spin.spec.arch import arch_from_hf_config

    arch = arch_from_hf_config({"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_attention_heads": 4,
                                "num_key_value_heads": 2, "num_hidden_layers": 2, "intermediate_size": 96,
                                "vocab_size": 256, "num_experts": 4, "num_experts_per_tok": 2,
                                "moe_intermediate_size": 48})
    cpu = Platform(device="cpu", backend="gloo", has_te=False)
    with pytest.raises(LayoutError, match="sequence parallelism.*use TP=1 and split the experts with EP"):
        check_moe_training(arch, ParallelLayout(2, 1, ep=2), cpu)
    check_moe_training(arch, ParallelLayout(1, 1, ep=2), cpu)  # EP alone trains
    check_moe_training(arch, ParallelLayout(2, 1), Platform(device="cuda", backend="nccl", has_te=True))


def _sequence_padding_jobs(rank, world_size, ckpt, pairs):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    pctx = init_parallel(ParallelLayout())
    out = {}
    for multiple in (1, 16):
        batch = collate_pairs(pairs, pad_id=0, pad_to_multiple_of=multiple)
        actor = Actor.build(arch, pctx, OptimConfig(optimizer="sgd", lr=0.05), LossConfig(beta=0.5), init_from=ckpt,
                            moe_aux_loss_coeff=0.5)
        ref = Reference.build(arch, pctx, init_from=ckpt)
        mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, 2), 0, 1)
        metrics = [actor.train_step(mbs, ref.logps(mbs)) for _ in range(2)]
        out[multiple] = (batch.tokens.shape[1], [m["loss"] for m in metrics],
                         {n: p.detach().clone() for n, p in actor.modules[0].named_parameters()})
    return out


def test_the_load_balancing_loss_does_not_count_padding(moe):
    """The router's auxiliary loss averages over tokens: sequences right-padded to a multiple of 16
    must give the same update as unpadded ones, which holds only if the padding is masked out of it
    (the update hands Megatron a padding mask when the loss is on)."""
    _, ckpt = moe
    (out,) = launch(_sequence_padding_jobs, 1, (str(ckpt), synthetic_pairs(4, seed=5)), timeout=LAUNCH_TIMEOUT)
    (s1, losses1, w1), (s16, losses16, w16) = out[1], out[16]
    assert s1 % 16 and s16 % 16 == 0
    assert losses1 == pytest.approx(losses16, rel=1e-6, abs=1e-7)
    router = "decoder.layers.0.mlp.router.weight"
    for name, w in w1.items():
        torch.testing.assert_close(w16[name], w, rtol=0, atol=1e-6, msg=name)
    assert (w1[router] - w16[router]).abs().max() <= 1e-6
