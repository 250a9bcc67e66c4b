"""The log-prob probe catches a push that left the engines with other weights, through the run's own
cluster (Ray-placed trainer ranks, an embedded engine), and the run's check stops with a clear error.

A correct push leaves the engine's log-probs of the probe within float rounding of the actor's;
then a SIMULATED FAULT — one tensor of the engine overwritten behind the trainer's back, as a lost
or corrupted bucket would leave it — must push the gap far above ``verify_tolerance``.
"""

from __future__ import annotations

import pytest
import torch

from megatron_spin.config.run import ActorRolloutRefConfig, ModelConfig, RolloutConfig, RunConfig, TrainerConfig
from megatron_spin.data.config import DataConfig
from megatron_spin.sync.config import SyncConfig
from megatron_spin.sync.verify import ProbeMismatch
from megatron_spin.wire.tensor_payload import encode_named_tensors

pytestmark = [pytest.mark.timeout(600)]


def test_a_corrupted_push_is_caught_by_the_probe(tiny_chat_model, spin_cache, tmp_path, monkeypatch):
    from megatron_spin.driver.build import build_run

    monkeypatch.setenv("MEGATRON_SPIN_CACHE", str(spin_cache))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(f'{{"prompt": "Say something about {i}."}}\n' for i in range(4)))
    sync = SyncConfig(verify_every=1, verify_tolerance=0.05)
    cfg = RunConfig(data=DataConfig(train_files=(str(prompts),), val_files=(), train_batch_size=2,
                                    max_prompt_length=128, max_response_length=32),  # the tiny model: 256 positions
                    actor_rollout_ref=ActorRolloutRefConfig(model=ModelConfig(str(tiny_chat_model)),
                                                            rollout=RolloutConfig(sync=sync)),
                    # Ray: without it the rank would live in pytest's own process (process groups,
                    # Megatron state, fork hooks) for the rest of the session.
                    trainer=TrainerConfig(default_local_dir=str(tmp_path / "run"), timeout_s=300.0, use_ray=True))
    parts = build_run(cfg, tmp_path / "run", None)
    probe = [p.input_ids for p in parts.loader.prompts[:2]]
    with parts.cluster as cluster:
        cluster.push(1)
        clean = cluster.verify_push(probe)
        clean.check(sync.verify_tolerance, "1")  # nothing to report
        # SIMULATED FAULT: the engine's final norm replaced, as a lost bucket would leave it stale.
        engine = cluster.fleet.slots[0].client
        engine.begin_weight_update()
        norm = torch.full((32,), 3.0)
        engine.update_weights_from_tensor([encode_named_tensors([("model.norm.weight", norm)])])
        engine.end_weight_update()
        corrupted = cluster.verify_push(probe)
    assert max(clean.max_abs.values()) <= 1e-4 and max(clean.mean_abs.values()) <= 1e-5, clean
    metrics = corrupted.as_metrics()
    assert metrics["sync/logprob_gap_mean"] > sync.verify_tolerance, metrics
    with pytest.raises(ProbeMismatch, match=r"after weight push 2, engine log-probs differ from the trainer's by a "
                                            r"mean .* above rollout\.sync\.verify_tolerance=0\.05"):
        corrupted.check(sync.verify_tolerance, "2")
