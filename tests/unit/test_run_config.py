"""The run config: Hydra composition and overrides, and start-up errors that name the key."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from megatron_spin.config.optim import ConfigError
from megatron_spin.config.run import load_run_config, to_dict


def composed(*overrides):
    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        return compose(config_name="spin_trainer", overrides=list(overrides))


def test_default_config_is_the_embedded_cpu_run():
    cfg = load_run_config(composed())
    assert cfg.data.embedded == "movie_reviews" and cfg.reward_model.type == "vader"
    assert cfg.rollout.engine == "embedded" and cfg.trainer.n_gpus_per_node == 0
    assert cfg.trainer.default_local_dir == "runs/megatron_spin/embedded_vader"  # interpolation resolved
    assert to_dict(cfg)["actor_rollout_ref"]["actor"]["optim"]["lr"] == 1e-5


def test_overrides_reach_the_typed_records():
    cfg = load_run_config(composed(
        "actor_rollout_ref.actor.tp=2", "trainer.total_training_steps=2", "algorithm.spin=true",
        "actor_rollout_ref.rollout.n=1", "trainer.logger=[jsonl,tensorboard]", "trainer.experiment_name=x",
        "actor_rollout_ref.actor.optim.lr=1e-5", "data.train_files=[a.jsonl,b.parquet]"))
    assert cfg.actor.tp == 2 and cfg.trainer.total_training_steps == 2 and cfg.algorithm.spin
    assert cfg.trainer.logger == ("jsonl", "tensorboard") and cfg.trainer.default_local_dir.endswith("/x")
    assert cfg.actor.optim.lr == 1e-5 and cfg.data.train_files == ("a.jsonl", "b.parquet")


@pytest.mark.parametrize("override,message", [
    ("+data.max_prompt_lenght=3", r"data\.max_prompt_lenght: unknown key"),
    ("actor_rollout_ref.actor.tp=two", r"actor_rollout_ref\.actor\.tp: expected int"),
    ("actor_rollout_ref.actor.tp=0", r"actor_rollout_ref\.actor\.tp: must be >= 1"),
    ("actor_rollout_ref.actor.optim.lr=-1", r"actor_rollout_ref\.actor\.optim\.lr=-1\.0"),
    ("actor_rollout_ref.rollout.n=1", r"actor_rollout_ref\.rollout\.n: online DPO needs n >= 2"),
    ("actor_rollout_ref.rollout.engine=sglang", r"actor_rollout_ref\.rollout\.engine: sglang needs GPUs"),
    ("actor_rollout_ref.rollout.sync.transport=pigeon", r"actor_rollout_ref\.rollout\.sync\.transport"),
    ("actor_rollout_ref.rollout.tp_size=2", r"actor_rollout_ref\.rollout\.tp_size: the embedded engine"),
    ("algorithm.dpo_loss_type=kto", r"algorithm\.dpo_loss_type='kto'"),
    ("algorithm.dpo_beta=0", r"algorithm\.dpo_beta=0\.0"),
    ("algorithm.pair_strategy=random", r"algorithm\.pair_strategy"),
    ("reward_model.type=hf", r"reward_model\.path is required"),
    ("trainer.logger=[console,mlflow]", r"trainer\.logger: unknown logger"),
    ("trainer.total_training_steps=0", r"trainer\.total_training_steps: must be >= 1"),
    ("data.embedded=null", r"data\.train_files: give prompt files"),
    ("actor_rollout_ref.actor.fp8={format:hybrid}", r"actor_rollout_ref\.actor\.fp8: FP8 needs TransformerEngine"),
    ("actor_rollout_ref.actor.fp8={recipe:fast}", r"actor_rollout_ref\.actor\.fp8\.recipe='fast' is not one of"),
])
def test_bad_values_are_refused_at_start_up_naming_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(composed(override))


def test_fp8_keys_map_onto_the_model_precision():
    cfg = load_run_config(composed("trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang",
                                   "actor_rollout_ref.actor.precision=bf16",
                                   "actor_rollout_ref.actor.fp8={format:e4m3,recipe:blockwise,amax_history_len:16}"))
    kw = cfg.actor.model_precision().transformer_config_kwargs()
    assert kw["bf16"] and kw["fp8"] == "e4m3" and kw["fp8_recipe"] == "blockwise" and kw["fp8_amax_history_len"] == 16
    assert load_run_config(composed()).actor.model_precision().fp8 is None
