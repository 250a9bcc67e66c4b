"""The actor update on Megatron: layout independence, learning, reference refresh, masked ranks.

Layout equivalence runs every layout in one 4-rank launch (smaller layouts use data
parallelism over the spare ranks, which is itself part of what is checked: the update must
not depend on the number of ranks).  SGD keeps the comparison sharp (DESIGN.md: Adam
amplifies 1e-7 noise near zero), Adam with a large eps covers the distributed optimizer.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_spin.loss.config import LossConfig
from megatron_spin.train.config import BatchConfig, OptimConfig
from megatron_spin.pairs import PreferencePair, collate_pairs
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

VOCAB = 256
GOOD = list(range(10, 20))  # chosen responses draw from these tokens
BAD = list(range(20, 30))  # rejected responses from these


def synthetic_pairs(n: int, seed: int) -> list[PreferencePair]:
    """Random prompts; chosen = GOOD tokens, rejected = BAD tokens (different lengths)."""
    g = torch.Generator().manual_seed(seed)
    pairs = []
    for i in range(n):
        prompt = torch.randint(40, VOCAB, (6,), generator=g).tolist()
        chosen = [GOOD[j] for j in torch.randint(0, 10, (5,), generator=g)]
        rejected = [BAD[j] for j in torch.randint(0, 10, (4,), generator=g)]
        pairs.append(PreferencePair(f"p{seed}-{i}", prompt, chosen, rejected, 1.0, 0.0, None))
    return pairs



def _train_jobs(rank, world_size, ckpt, jobs, batch, out_root):
    """For each (name, layout, optim, micro_pairs): 2 updates from ``ckpt``, save the weights."""
    from megatron_spin.ckpt.model_io import save_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    results = {}
    for name, layout, optim, micro_pairs in jobs:
        pctx = init_parallel(layout)
        actor = Actor.build(arch, pctx, optim, LossConfig(beta=0.5), init_from=ckpt)
        ref = Reference.build(arch, pctx, init_from=ckpt)
        mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, micro_pairs), pctx.dp_rank, pctx.dp_size)
        ref_logps = ref.logps(mbs)
        history = [actor.train_step(mbs, ref_logps) for _ in range(2)]
        save_model_weights(actor.modules, f"{out_root}/{name}")
        if pctx.is_last_stage and pctx.tp_rank == 0 and pctx.dp_rank == 0:
            results[name] = history
        destroy_parallel()
    return results


def _read_weights(rank, world_size, ckpt_dirs, arch_from):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.convert.streaming import iter_megatron_checkpoint
    from megatron_spin.parallel.groups import init_parallel

    arch = read_arch(arch_from)
    pctx = init_parallel(ParallelLayout())
    return [{p.megatron: t.clone() for p, t in iter_megatron_checkpoint(arch, pctx, d)} for d in ckpt_dirs]


def _train_jobs_then_read(rank, world_size, ckpt, jobs, batch, out_root):
    """``_train_jobs``, then rank 0 reads every saved model back (full TP=1 tensors, from the
    files): the same ranks, one process start-up less than a separate read launch."""
    from megatron_spin.parallel.groups import init_parallel

    results = _train_jobs(rank, world_size, ckpt, jobs, batch, out_root)
    if rank != 0:
        init_parallel(ParallelLayout())  # collective: rank 0's _read_weights calls it too
        return results, None
    return results, _read_weights(rank, world_size, [f"{out_root}/{name}" for name, *_ in jobs], ckpt)


def test_update_is_layout_independent(tiny_ckpt, tmp_path):
    sgd = OptimConfig(optimizer="sgd", lr=0.05, clip_grad=1.0)
    adam = OptimConfig(optimizer="adam", lr=1e-3, adam_eps=1e-2, clip_grad=1.0)
    jobs = [
        ("tp1_dp4", ParallelLayout(1, 1), sgd, 1),
        ("tp2_dp2", ParallelLayout(2, 1), sgd, 1),
        ("pp2_dp2", ParallelLayout(1, 2), sgd, 1),
        ("tp2pp2", ParallelLayout(2, 2), sgd, 1),
        ("tp2pp2_micro2", ParallelLayout(2, 2), sgd, 2),
        ("pp2vpp2_dp2", ParallelLayout(1, 2, vpp=2), sgd, 1),
        ("adam_tp1_dp4", ParallelLayout(1, 1), adam, 1),
        ("adam_distopt_tp1_dp4", ParallelLayout(1, 1), dataclasses.replace(adam, use_distributed_optimizer=True), 1),
        ("adam_distopt_tp2_dp2", ParallelLayout(2, 1), dataclasses.replace(adam, use_distributed_optimizer=True), 1),
    ]
    batch = collate_pairs(synthetic_pairs(4, seed=0), pad_id=0)
    per_rank = launch(_train_jobs_then_read, 4, (str(tiny_ckpt), jobs, batch, str(tmp_path)), timeout=LAUNCH_TIMEOUT)
    metrics = {k: v for r, _ in per_rank for k, v in r.items()}
    names = [j[0] for j in jobs]
    weights = dict(zip(names, per_rank[0][1]))
    # The first step starts from actor == reference: loss log 2 exactly, everywhere.
    for name in names:
        assert metrics[name][0]["loss"] == pytest.approx(math.log(2), abs=1e-6), name
    for base, others in (("tp1_dp4", names[1:6]), ("adam_tp1_dp4", names[7:])):
        for name in others:
            for step in range(2):
                for key in ("loss", "grad_norm", "reward_margin", "logps_chosen"):
                    assert metrics[name][step][key] == pytest.approx(metrics[base][step][key], rel=1e-5, abs=1e-6), (name, step, key)
            for pname, w in weights[base].items():
                torch.testing.assert_close(weights[name][pname], w, rtol=0, atol=2e-6, msg=f"{name}: {pname}")
    # The update did something (else equality would be vacuous).
    delta = max((weights["tp1_dp4"][k] - weights["adam_tp1_dp4"][k]).abs().max().item() for k in weights["tp1_dp4"])
    assert delta > 1e-4


def test_qwen3_update_is_layout_independent(tmp_path):
    """Qwen3's q/k norm weights are replicated over TP but each rank's copy only sees its own
    heads: Megatron sums their gradients across TP (finalize_model_grads).  Were that skipped,
    TP=2's norms would move differently from TP=1's (and the TP ranks' copies would diverge)."""
    from megatron_spin.convert.pipeline import convert_hf_to_megatron
    from tests.conftest import make_tiny_hf

    hf = make_tiny_hf(tmp_path / "hf", "qwen3", tied=True, layers=2)
    ckpt = tmp_path / "mcore"
    convert_hf_to_megatron(hf, ckpt, log=lambda *_: None)
    sgd = OptimConfig(optimizer="sgd", lr=0.05, clip_grad=1.0)
    jobs = [("tp1_dp4", ParallelLayout(1, 1), sgd, 1), ("tp2_dp2", ParallelLayout(2, 1), sgd, 1),
            ("tp2pp2", ParallelLayout(2, 2), sgd, 1)]
    batch = collate_pairs(synthetic_pairs(4, seed=0), pad_id=0)
    per_rank = launch(_train_jobs, 4, (str(ckpt), jobs, batch, str(tmp_path)), timeout=LAUNCH_TIMEOUT)
    metrics = {k: v for r in per_rank for k, v in r.items()}
    names = [j[0] for j in jobs]
    (weights,) = launch(_read_weights, 1, ([str(tmp_path / n) for n in names], str(ckpt)), timeout=LAUNCH_TIMEOUT)
    weights = dict(zip(names, weights))
    (before,) = launch(_read_weights, 1, ([str(ckpt)], str(ckpt)), timeout=LAUNCH_TIMEOUT)[0]
    q_norm = "decoder.layers.1.self_attention.q_layernorm.weight"
    # The norms did move, by 10× the tolerance below (a TP rank's partial gradient alone would
    # miss it by about half the step).
    assert (weights["tp1_dp4"][q_norm] - before[q_norm]).abs().max() > 2e-5
    for name in names[1:]:
        for step in range(2):
            for key in ("loss", "grad_norm"):
                assert metrics[name][step][key] == pytest.approx(metrics["tp1_dp4"][step][key], rel=1e-5, abs=1e-6)
        for pname, w in weights["tp1_dp4"].items():
            torch.testing.assert_close(weights[name][pname], w, rtol=0, atol=2e-6, msg=f"{name}: {pname}")

def _learn(rank, world_size, ckpt, train_batch, held_out, steps):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.evaluate import preference_metrics
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    pctx = init_parallel(ParallelLayout())
    loss_cfg = LossConfig(beta=0.2)
    optim = OptimConfig(optimizer="adam", lr=2e-3, lr_warmup_steps=2, lr_decay_steps=steps, lr_decay_style="cosine",
                        min_lr=2e-4)
    actor = Actor.build(arch, pctx, optim, loss_cfg, init_from=ckpt)
    ref = Reference.build(arch, pctx, init_from=ckpt)
    mbs = rank_micro_batches(train_batch, BatchConfig(train_batch.num_pairs, 2), 0, 1)
    held = held_out.split_micro_batches(2)
    ref_train, ref_held = ref.logps(mbs), ref.logps(held)
    before = preference_metrics(actor.logps(held), ref_held, held, loss_cfg)
    history = [actor.train_step(mbs, ref_train) for _ in range(steps)]
    after = preference_metrics(actor.logps(held), ref_held, held, loss_cfg)
    # Reference refresh: in-memory copy, exact.
    ref.refresh_from(actor.modules)
    same_weights = all(torch.equal(a, r) for a, r in zip(
        [p for m in actor.modules for p in m.parameters()], [p for m in ref.chunks for p in m.parameters()]))
    same_logps = all(torch.equal(a, r) for a, r in zip(actor.logps(held), ref.logps(held)))
    return history, before, after, same_weights, same_logps


def test_learns_a_preference_and_generalises(tiny_ckpt):
    steps = 20
    train = collate_pairs(synthetic_pairs(8, seed=1), pad_id=0)
    held_out = collate_pairs(synthetic_pairs(8, seed=2), pad_id=0)
    (result,) = launch(_learn, 1, (str(tiny_ckpt), train, held_out, steps), timeout=LAUNCH_TIMEOUT)
    history, before, after, same_weights, same_logps = result
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[0]["reward_accuracy"] == 0.0  # actor == reference: no pair is preferred yet
    assert history[-1]["reward_accuracy"] == 1.0
    assert after["loss"] < before["loss"] and after["reward_accuracy"] > 0.9 >= before["reward_accuracy"]
    # Update s (1-based) runs at: 2e-3·s/2 during the 2 warmup steps, then cosine to 2e-4 at s = steps.
    def expected_lr(s: int) -> float:
        if s <= 2:
            return 2e-3 * s / 2
        progress = (s - 2) / (steps - 2)
        return 2e-4 + (2e-3 - 2e-4) * 0.5 * (1 + math.cos(math.pi * progress))

    assert [h["lr"] for h in history] == pytest.approx([expected_lr(s) for s in range(1, steps + 1)])
    assert same_weights and same_logps


def _masked_rank(rank, world_size, ckpt, batch):
    """DP=2 where rank 1's micro-batch has no response token at all."""
    from types import SimpleNamespace

    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    pctx = init_parallel(ParallelLayout())
    actor = Actor.build(arch, pctx, OptimConfig(optimizer="sgd", lr=0.05), LossConfig(beta=0.5), init_from=ckpt)
    ref = Reference.build(arch, pctx, init_from=ckpt)
    mb = batch.select_pairs([rank])
    if rank == 1:
        mb = SimpleNamespace(tokens=mb.tokens, loss_mask=torch.zeros_like(mb.loss_mask),
                             response_lengths=torch.zeros_like(mb.response_lengths), num_pairs=1,
                             pair_weights=mb.pair_weights, loss_scale=mb.loss_scale)
    ref_logps = ref.logps([mb])
    metrics = actor.train_step([mb], ref_logps)
    finite = all(torch.isfinite(p).all().item() for m in actor.modules for p in m.parameters())
    return metrics, finite


def test_no_nan_when_a_rank_has_only_masked_tokens(tiny_ckpt):
    batch = collate_pairs(synthetic_pairs(2, seed=3), pad_id=0)
    for metrics, finite in launch(_masked_rank, 2, (str(tiny_ckpt), batch), timeout=LAUNCH_TIMEOUT):
        assert finite
        assert all(math.isfinite(v) for v in metrics.values()), metrics


def _megatron_logps(rank, world_size, ckpt, layouts, batch):
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.train.step import forward_logps

    out = {}
    for layout in layouts:
        pctx = init_parallel(layout)
        chunks = build_model(read_arch(ckpt), pctx, init_weights=False)
        load_model_weights(chunks, ckpt)
        logps = forward_logps(chunks, batch.split_micro_batches(1))
        if logps is not None and pctx.tp_rank == 0 and pctx.dp_rank == 0:
            out[(layout.tp, layout.pp)] = logps
        destroy_parallel()
    return out


def test_response_logps_equal_hf(tiny_ckpt):
    """Vocab-parallel response log-probs (TP=2, PP=2) equal HF's for the same weights."""
    from megatron_spin.convert.parity import hf_logits

    pairs = synthetic_pairs(2, seed=4)
    batch = collate_pairs(pairs, pad_id=0)
    ref = torch.log_softmax(hf_logits(tiny_ckpt.parent / "hf", batch.tokens), dim=-1)
    expected = []
    for row in range(batch.tokens.shape[0]):
        pair = pairs[row % 2]
        response = pair.chosen_ids if row < 2 else pair.rejected_ids
        start = len(pair.prompt_ids)  # first response token's position
        expected.append(sum(ref[row, start - 1 + j, tok].item() for j, tok in enumerate(response)))
    per_rank = launch(_megatron_logps, 2, (str(tiny_ckpt), [ParallelLayout(2, 1), ParallelLayout(1, 2)], batch),
                      timeout=LAUNCH_TIMEOUT)
    got = {k: v for r in per_rank for k, v in r.items()}
    assert set(got) == {(2, 1), (1, 2)}
    for layout, micro in got.items():
        # micro-batches of one pair: [chosen, rejected] each
        flat = [micro[0][0], micro[1][0], micro[0][1], micro[1][1]]
        torch.testing.assert_close(torch.tensor(flat), torch.tensor(expected), rtol=0, atol=1e-4,
                                   msg=f"layout {layout}")


def _padded_vs_not(rank, world_size, ckpt, pairs):
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
        actor = Actor.build(arch, pctx, OptimConfig(optimizer="sgd", lr=0.05), LossConfig(beta=0.5), init_from=ckpt)
        ref = Reference.build(arch, pctx, init_from=ckpt)
        mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, 2), 0, 1)
        ref_logps = ref.logps(mbs)
        metrics = actor.train_step(mbs, ref_logps)
        out[multiple] = (batch.tokens.shape[1], torch.cat(ref_logps), metrics["loss"],
                         [p.detach().clone() for c in actor.modules for p in c.parameters()])
    return out


def test_padding_sequences_to_a_multiple_of_16_changes_nothing(tiny_ckpt):
    """FP8 (TransformerEngine) needs the token dimension divisible by 16, so FP8 runs pad every
    batch to such lengths; the pad is masked: log-probs, loss and update equal the unpadded ones."""
    from megatron_spin.spec.precision import FP8Settings, Precision

    assert Precision("bfloat16", fp8=FP8Settings()).sequence_multiple == 16 and Precision().sequence_multiple == 1
    (out,) = launch(_padded_vs_not, 1, (tiny_ckpt, synthetic_pairs(4, seed=5)), timeout=LAUNCH_TIMEOUT)
    (s1, logps1, loss1, w1), (s16, logps16, loss16, w16) = out[1], out[16]
    assert s1 % 16 != 0 and s16 % 16 == 0 and s16 > s1
    assert torch.allclose(logps1, logps16, atol=1e-5, rtol=0), (logps1 - logps16).abs().max()
    assert abs(loss1 - loss16) <= 1e-6
    assert max(float((a - b).abs().max()) for a, b in zip(w1, w16)) <= 1e-6


def _padding_jobs(rank, world_size, ckpt, batch, micro_pairs):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    out = {}
    for micro in micro_pairs:
        pctx = init_parallel(ParallelLayout())  # two ranks: DP=2
        actor = Actor.build(arch, pctx, OptimConfig(optimizer="sgd", lr=0.05), LossConfig(beta=0.5), init_from=ckpt)
        ref = Reference.build(arch, pctx, init_from=ckpt)
        padded = batch.padded_to(micro * pctx.dp_size)
        mbs = rank_micro_batches(padded, BatchConfig(padded.num_pairs, micro), pctx.dp_rank, pctx.dp_size)
        metrics = actor.train_step(mbs, ref.logps(mbs))
        out[micro] = (padded.num_pairs, metrics, [p.detach().clone() for c in actor.modules for p in c.parameters()])
        destroy_parallel()
    return out


def test_padding_pairs_carry_no_loss_and_the_update_equals_the_unpadded_one(tiny_ckpt):
    """Six pairs on two DP ranks: micro-batches of 1 or 3 pairs need no padding; of 4 or 5 they need
    2 or 4 padding pairs (one rank gets 1 real pair and 4 padding ones).  Every update — loss,
    metrics, weights — equals the unpadded one: no pair is dropped, none counts twice."""
    batch = collate_pairs(synthetic_pairs(6, seed=11), pad_id=0)
    out, other = launch(_padding_jobs, 2, (tiny_ckpt, batch, (1, 3, 4, 5)), timeout=LAUNCH_TIMEOUT)
    assert [out[m][0] for m in (1, 3, 4, 5)] == [6, 6, 8, 10]
    _, ref_metrics, ref_weights = out[1]
    assert ref_metrics["pairs"] == 6
    for micro in (3, 4, 5):
        _, metrics, weights = out[micro]
        assert metrics["pairs"] == 6, micro
        for key in ("loss", "reward_accuracy", "reward_margin", "logps_chosen", "response_tokens", "grad_norm"):
            assert math.isclose(metrics[key], ref_metrics[key], rel_tol=1e-5, abs_tol=1e-6), (micro, key)
        assert max(float((a - b).abs().max()) for a, b in zip(weights, ref_weights)) <= 1e-6, micro
    assert all(math.isclose(other[m][1]["loss"], out[m][1]["loss"], rel_tol=1e-6) for m in (1, 4))  # both ranks agree
