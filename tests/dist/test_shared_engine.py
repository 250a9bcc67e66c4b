"""The ``shared`` transport: the embedded engine inside the trainer rank, serving the actor's own
parameters (:mod:`megatron_spin.rollout.embedded.in_process`).

A real Megatron actor (one gloo rank) and the engine in the same process, reached over HTTP on
127.0.0.1 as the driver reaches it; the push goes through the run's coordinator and stage sender
(``tests/dist/test_weight_sync.Push``).  Checked: the engine's tensors are the actor's memory
wherever the converter gives a view; after an in-place update the engine serves the new weights
once pushed, and the push moves only the split QKV; a checkpoint save in the rank (Megatron's
writer forks helpers) leaves the engine serving.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.parallel.launch import launch
from tests.conftest import LAUNCH_TIMEOUT, make_tiny_hf
from tests.dist.test_weight_sync import API_KEY, PROBE, Push, logprob_gap


def _shared_job(rank, world_size, ckpt, save_dir):
    from megatron_spin.ckpt.metadata import HF_SUBDIR, read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.parallel.groups import destroy_parallel, init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.rollout.client import EngineClient
    from megatron_spin.rollout.embedded.in_process import InProcessEngine
    from megatron_spin.rollout.fleet import RolloutFleet
    from megatron_spin.rollout.protocol import GenerateRequest, SamplingParams
    from megatron_spin.sync.config import PushTarget, SyncConfig
    from megatron_spin.sync.gather import iter_hf_weights
    from megatron_spin.sync.transports import SharedTransport
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.checkpoint import save_train_state
    from megatron_spin.train.config import OptimConfig

    pctx = init_parallel(ParallelLayout())
    arch = read_arch(ckpt)
    actor = Actor.build(arch, pctx, OptimConfig(optimizer="sgd", lr=0.05), LossConfig(beta=0.5), init_from=ckpt)
    served = InProcessEngine.start(str(ckpt / HF_SUBDIR), iter_hf_weights(actor.modules, arch, pctx), api_key=API_KEY)
    out = {}
    try:
        actor_storage = {p.untyped_storage().data_ptr() for m in actor.modules for p in m.parameters()}
        engine = {n: p for n, p in served.engine.model.named_parameters()}
        out["shared"] = sorted(n for n, p in engine.items() if p.untyped_storage().data_ptr() in actor_storage)
        out["own"] = sorted(n for n, p in engine.items() if p.untyped_storage().data_ptr() not in actor_storage)
        fleet = RolloutFleet([EngineClient(served.url, API_KEY)])
        out["gap_at_start"] = max(logprob_gap(actor.modules, pctx, fleet, PROBE).values())
        with torch.no_grad():  # an optimizer step, in place
            torch.manual_seed(0)
            for m in actor.modules:
                for p in m.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        out["gap_before_push"] = max(logprob_gap(actor.modules, pctx, fleet, PROBE).values())
        push = Push(SyncConfig(transport="shared"), PushTarget(api_key=API_KEY), arch, pctx, fleet,
                    transport=SharedTransport(served.engine))
        report = push.push(actor.modules, 1)
        out["pushed_bytes"], out["tensors"], out["version"] = report.bytes, report.tensors, report.version
        out["gap_after_push"] = max(logprob_gap(actor.modules, pctx, fleet, PROBE).values())
        out["qkv_bytes"] = sum(p.numel() * p.element_size() for n, p in engine.items()
                               if n.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")))
        save_train_state(actor, None, save_dir)
        request = GenerateRequest(input_ids=(tuple(PROBE[0][:4]),), sampling=SamplingParams(max_new_tokens=4, n=2, seed=1))
        replies = fleet.slots[0].client.generate(request, timeout=60)
        out["after_save"] = [(len(c.output_ids), c.weight_version) for r in replies for c in r]
        push.close()
        fleet.close()
    finally:
        served.stop()
        destroy_parallel()
    return out


@pytest.mark.parametrize("tied", [False, True])
def test_shared_engine_serves_the_actors_parameters_in_place(tmp_path, tied):
    hf = make_tiny_hf(tmp_path / "hf", "llama", tied=tied, layers=2)
    convert_hf_to_megatron(hf, tmp_path / "mcore", log=lambda *_: None)
    (out,) = launch(_shared_job, 1, (tmp_path / "mcore", str(tmp_path / "saved")), timeout=LAUNCH_TIMEOUT)
    # Every tensor but the split QKV is the actor's own memory.
    assert out["own"] == sorted(f"model.layers.{i}.self_attn.{x}_proj.weight" for i in range(2) for x in "qkv")
    assert "model.embed_tokens.weight" in out["shared"] and "model.layers.1.mlp.up_proj.weight" in out["shared"]
    assert out["gap_at_start"] <= 1e-4
    assert out["gap_before_push"] > 1e-2  # the QKV copies are stale until the push
    assert out["gap_after_push"] <= 1e-4
    assert out["pushed_bytes"] == out["qkv_bytes"]  # only what the converter had to build moved
    assert out["tensors"] == 2 * 9 + 2 + (0 if tied else 1) and out["version"] == "1"
    assert out["after_save"] == [(4, "1"), (4, "1")]
