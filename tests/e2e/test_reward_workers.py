"""A reward model scored by Ray workers gives the same scores, in order, as scoring it directly."""

from __future__ import annotations

import pytest
import torch

from megatron_spin.reward import RewardConfig, RewardInput, build_reward

pytestmark = [pytest.mark.timeout(300)]


def test_reward_pool_matches_direct_scoring(smollm2_dir, tmp_path):
    import ray
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    from megatron_spin.orchestrate.rewards import RewardPool, build_reward_pool

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=tok.pad_token_id or tok.eos_token_id,
    )).save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    cfg = RewardConfig(type="hf", path=str(tmp_path / "rm"), batch_size=2, num_workers=2)
    inputs = [RewardInput(f"prompt {i}", "word " * (i % 4 + 1) + str(i)) for i in range(7)]
    direct = build_reward(cfg)(inputs)
    ray.init(address="local", num_cpus=3, include_dashboard=False)  # never a `ray start` cluster on the host
    try:
        pool = build_reward_pool(cfg, timeout_s=120)
        assert isinstance(pool, RewardPool) and len(pool.workers) == 2
        assert pool(inputs) == pytest.approx(direct, abs=1e-5)
        assert pool(inputs[:1]) == pytest.approx(direct[:1], abs=1e-5)  # fewer samples than workers
        pool.close()
        assert not isinstance(build_reward_pool(RewardConfig(type="vader"), timeout_s=1), RewardPool)
    finally:
        ray.shutdown()
