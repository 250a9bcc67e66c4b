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


def preset(name, *overrides):
    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


SITE = ("actor_rollout_ref.model.path=/models/llama", "data.train_files=[/data/p.jsonl]", "reward_model.path=/models/rm",
        "trainer.ray_address=head:6379")


@pytest.mark.parametrize("name,tp,pp,nodes", [("spin_8b", 2, 2, 1), ("spin_70b", 8, 4, 8)])
def test_gpu_presets_validate_once_site_keys_are_given(name, tp, pp, nodes):
    cfg = load_run_config(preset(name, *SITE))
    assert (cfg.actor.tp, cfg.actor.pp, cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (tp, pp, nodes, 8)
    assert cfg.rollout.engine == "sglang" and cfg.actor.precision == "bf16" and cfg.actor.optim.use_distributed_optimizer
    assert cfg.rollout.sync.dtype == "bfloat16"


@pytest.mark.parametrize("missing,message", [
    ("actor_rollout_ref.model.path", r"actor_rollout_ref\.model\.path: required"),
    ("data.train_files", r"data\.train_files: give prompt files"),
    ("reward_model.path", r"reward_model\.path is required"),
    ("trainer.ray_address", r"trainer\.ray_address: a run on trainer\.nnodes=8 nodes joins a Ray cluster"),
])
def test_a_preset_names_each_site_key_it_leaves_to_the_user(missing, message):
    given = [s for s in SITE if not s.startswith(missing)]
    with pytest.raises(ConfigError, match=message):
        load_run_config(preset("spin_70b", *given))


def test_a_missing_mandatory_value_is_named():
    with pytest.raises(ConfigError, match=r"data\.prompt_key: required, the preset leaves it to you"):
        load_run_config(composed("data.prompt_key=???"))


@pytest.mark.parametrize("overrides,message", [
    (("actor_rollout_ref.rollout.quantization=int4",), r"rollout\.quantization: null or fp8"),
    (("actor_rollout_ref.rollout.quantization=fp8",), r"rollout\.quantization: only SGLang engines quantise"),
    (("actor_rollout_ref.rollout.quantization=fp8", "actor_rollout_ref.rollout.sync.dtype=float32",
      "actor_rollout_ref.rollout.engine=sglang", "trainer.n_gpus_per_node=8"),
     r"rollout\.sync\.dtype: an FP8-serving engine quantises what it receives"),
])
def test_rollout_quantization_rules(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(composed(*overrides))


def test_fp8_serving_reaches_the_sglang_command():
    from megatron_spin.rollout.launcher import sglang_command

    cfg = load_run_config(preset("spin_70b", *SITE, "actor_rollout_ref.rollout.quantization=fp8"))
    assert cfg.rollout.quantization == "fp8" and load_run_config(preset("spin_70b", *SITE)).rollout.quantization is None
    cmd = sglang_command("/m", tp_size=cfg.rollout.tp_size, quantization=cfg.rollout.quantization)
    assert cmd[cmd.index("--quantization") + 1] == "fp8" and cmd[cmd.index("--tp-size") + 1] == "8"
    assert "--quantization" not in sglang_command("/m")


def test_fp8_on_this_cpu_machine_stops_the_cli_before_anything_starts(tmp_path):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "megatron_spin.main",
                           "actor_rollout_ref.actor.fp8={format: hybrid, recipe: delayed}",
                           f"trainer.default_local_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert "config error: actor_rollout_ref.actor.fp8: FP8 needs TransformerEngine on CUDA GPUs" in done.stderr
    # Refused before the run wrote anything (Hydra itself creates the directory and its empty log).
    run = tmp_path / "run"
    assert not run.exists() or {p.name for p in run.iterdir()} <= {"main.log"}


def test_a_missing_value_that_another_key_interpolates_is_named_not_a_crash():
    with pytest.raises(ConfigError, match=r"trainer\.experiment_name: required"):
        load_run_config(composed("trainer.experiment_name=???"))
