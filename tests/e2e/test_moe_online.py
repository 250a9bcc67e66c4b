"""A mixture-of-experts model through the whole online loop from the command line, at EP=2.

A tiny random Qwen3-MoE (4 experts, top 2, built offline from a config, with SmolLM2's tokenizer
and chat template) on two CPU trainer ranks (``trainer.cpu_ranks=2``: DP=2, and EP=2 splits each
layer's experts over them, tokens reaching their experts by all-to-all); the embedded engine
serves the HF model natively and receives every expert of every layer after each update; a
rule reward; a held-out evaluation; Megatron's load-balancing loss on; the distributed optimizer
(a chain of two: dense weights sharded over DP=2, experts over expert-DP=1).  Four steps straight,
and two steps + resume + two more, must agree exactly: metrics and every weight of the checkpoint.
"""

from __future__ import annotations

import json

import pytest
import torch

from tests.e2e.test_online import assert_same_run, records, run_cli, write_prompts

pytestmark = [pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def tiny_moe_chat_model(smollm2_dir, tmp_path_factory):
    from transformers import AutoTokenizer, GenerationConfig, Qwen3MoeConfig, Qwen3MoeForCausalLM

    out = tmp_path_factory.mktemp("moe") / "tiny-moe"
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                         num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1,
                         mlp_only_layers=[], num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    Qwen3MoeForCausalLM(cfg).save_pretrained(out)
    GenerationConfig(eos_token_id=tok.eos_token_id).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def test_moe_ep2_online_run_resumes_exactly(tiny_moe_chat_model, spin_cache, tmp_path):
    train = write_prompts(tmp_path / "train.jsonl", 10)
    val = write_prompts(tmp_path / "val.jsonl", 2)
    common = [f"actor_rollout_ref.model.path={tiny_moe_chat_model}", "trainer.cpu_ranks=2",
              "actor_rollout_ref.actor.ep=2", "actor_rollout_ref.actor.moe_aux_loss_coeff=0.01",
              "actor_rollout_ref.actor.optim.use_distributed_optimizer=true",
              f"data.train_files=[{train}]", f"data.val_files=[{val}]", "data.train_batch_size=4",
              "data.max_response_length=10", "actor_rollout_ref.rollout.n=3", "reward_model.type=function",
              "reward_model.function=tests.e2e.test_online:length_reward", "actor_rollout_ref.actor.optim.lr=1e-3",
              "trainer.save_freq=2", "trainer.test_freq=2", "actor_rollout_ref.actor.micro_pairs=1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    for steps, run_dir in ((4, straight), (2, resumed)):
        run_cli(tmp_path, *common, f"trainer.total_training_steps={steps}", f"trainer.default_local_dir={run_dir}",
                cache=spin_cache)
    done = run_cli(tmp_path, *common, "trainer.total_training_steps=4", f"trainer.default_local_dir={resumed}",
                   cache=spin_cache)
    steps = assert_same_run(straight, resumed, done)
    for r in steps:
        # Every push reached the engine and carried every expert (the coordinator checks each HF
        # tensor of the converter table arrived exactly once, or the step fails).
        assert r["pairs/kept"] >= 1 and r["sync/engines"] == 1 and r["weight_version"] == r["step"]
    assert [r["step"] for r in records(straight, "eval")] == [0, 2, 4]
    ranks = {json.loads(line)["dp"] for f in (straight / "ranks").iterdir() for line in f.read_text().splitlines()}
    assert ranks == {0, 1}  # both EP ranks trained
    saved = json.loads((straight / "config.json").read_text())["actor_rollout_ref"]["actor"]
    assert saved["ep"] == 2 and saved["moe_aux_loss_coeff"] == 0.01
