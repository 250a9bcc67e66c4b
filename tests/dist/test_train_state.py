"""Resuming the actor's training state is bit-exact for every optimizer and precision.

Per scenario (2 gloo ranks, a tiny Llama, LR warmup + cosine so the schedule matters): ``pre``
updates, save, 2 more updates (the reference); then a freshly built actor loads the save and
takes the same 2 updates: every local parameter must equal the reference exactly, with the same
losses.  The scenarios cover what broke before (finding 6 of issue 11): the distributed
optimizer's state (left out of its ``state_dict()``), its Adam step (lost in the load), the
schedule (``load_state_dict`` adds the saved step count), bf16 with the plain optimizer (its
sharded state mis-maps fp32 norm weights), a save before the first update, SGD momentum.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout
from tests.conftest import LAUNCH_TIMEOUT
from tests.dist.test_train_step import synthetic_pairs

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]

# name, layout (2 ranks), params dtype, optimizer kwargs, updates before the save
SCENARIOS = [
    ("dp2-distopt", ParallelLayout(), "float32", dict(use_distributed_optimizer=True), 2),
    ("dp2-distopt-bf16", ParallelLayout(), "bfloat16", dict(use_distributed_optimizer=True), 2),
    ("dp2-distopt-step0", ParallelLayout(), "float32", dict(use_distributed_optimizer=True), 0),
    ("pp2-adam-bf16", ParallelLayout(pp=2), "bfloat16", {}, 2),
    ("tp2-adam-step0", ParallelLayout(tp=2), "float32", {}, 0),
    ("tp2-sgd-momentum", ParallelLayout(tp=2), "float32", dict(optimizer="sgd", sgd_momentum=0.9), 2),
]



def _resume_jobs(rank, world_size, ckpt, root, batch):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.spec.precision import Precision
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.batching import rank_micro_batches
    from megatron_spin.train.checkpoint import load_train_state, save_train_state
    from megatron_spin.train.config import BatchConfig, OptimConfig
    from megatron_spin.train.reference import Reference

    arch = read_arch(ckpt)
    out = {}
    for name, layout, dtype, optim_kw, pre in SCENARIOS:
        optim = OptimConfig(**{"lr": 1e-3, "lr_warmup_steps": 1, "lr_decay_steps": 6, "lr_decay_style": "cosine",
                               **optim_kw})
        pctx = init_parallel(layout)

        def build():
            actor = Actor.build(arch, pctx, optim, LossConfig(beta=0.5), precision=Precision(dtype), init_from=ckpt)
            return actor, Reference.build(arch, pctx, precision=Precision(dtype), init_from=ckpt)

        def steps(actor, ref, n):
            mbs = rank_micro_batches(batch, BatchConfig(batch.num_pairs, 1), pctx.dp_rank, pctx.dp_size)
            ref_logps = ref.logps(mbs)
            return [actor.train_step(mbs, ref_logps).get("loss") for _ in range(n)]

        actor, ref = build()
        steps(actor, ref, pre)
        save_train_state(actor, ref, root / name)
        straight = steps(actor, ref, 2)
        expected = [p.detach().clone() for c in actor.modules for p in c.parameters()]
        actor, ref = build()
        load_train_state(actor, ref, root / name)
        resumed = steps(actor, ref, 2)
        got = [p.detach() for c in actor.modules for p in c.parameters()]
        diff = max(float((a.float() - b.float()).abs().max()) for a, b in zip(expected, got))
        out[name] = (straight, resumed, all(torch.equal(a, b) for a, b in zip(expected, got)), diff)
        destroy_parallel()
    return out


def test_training_state_resumes_bit_exactly(tiny_ckpt, tmp_path):
    from megatron_spin.pairs import collate_pairs

    batch = collate_pairs(synthetic_pairs(4, seed=3), pad_id=0)
    per_rank = launch(_resume_jobs, 2, (tiny_ckpt, tmp_path, batch), timeout=LAUNCH_TIMEOUT)
    for rank, out in enumerate(per_rank):
        for name, (straight, resumed, equal, diff) in out.items():
            assert equal, (rank, name, diff)
            assert straight == resumed, (rank, name, straight, resumed)
    assert any(l is not None for l in per_rank[1]["pp2-adam-bf16"][0])  # the last stage reports the loss


def test_another_layout_is_refused_naming_both(tiny_ckpt, tmp_path):
    errors = launch(_save_then_load, 2, (tiny_ckpt, tmp_path / "tp2", ParallelLayout(tp=2), ParallelLayout(pp=2)),
                    timeout=LAUNCH_TIMEOUT)
    assert all("was saved at {'layout': 'ParallelLayout(tp=2, pp=1, vpp=None)'" in e and "pp=2" in e for e in errors), errors


def _save_then_load(rank, world_size, ckpt, where, save_layout, load_layout):
    """Save at ``save_layout``, then (a fresh parallel state and actor) load at ``load_layout``:
    the same two ranks, one launch."""
    from megatron_spin.parallel.groups import destroy_parallel

    _save_one(rank, world_size, ckpt, where, save_layout)
    destroy_parallel()
    return _load_one(rank, world_size, ckpt, where, load_layout)


def _save_one(rank, world_size, ckpt, where, layout):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.checkpoint import save_train_state
    from megatron_spin.train.config import OptimConfig

    pctx = init_parallel(layout)
    save_train_state(Actor.build(read_arch(ckpt), pctx, OptimConfig(lr=1e-3), LossConfig(), init_from=ckpt), None, where)


def _load_one(rank, world_size, ckpt, where, layout):
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.checkpoint import ResumeError, load_train_state
    from megatron_spin.train.config import OptimConfig

    pctx = init_parallel(layout)
    try:
        load_train_state(Actor.build(read_arch(ckpt), pctx, OptimConfig(lr=1e-3), LossConfig(), init_from=ckpt), None,
                         where)
    except ResumeError as exc:
        return str(exc)
    return "loaded"
