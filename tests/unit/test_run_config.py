"""The run config: Hydra composition and overrides, and start-up errors that name the key.

Every record names the field it refuses relative to itself; the loader anchors it under the
section it read the record from, so every error a user sees starts with the full dotted key.
"""

from __future__ import annotations

import dataclasses
import re
import typing

import pytest
from hydra import compose, initialize_config_module

from megatron_spin.config.run import RunConfig, TrainerConfig, load_run_config, to_dict
from megatron_spin.data.config import DataConfig
from megatron_spin.errors import ConfigError
from megatron_spin.loss.config import LossConfig
from megatron_spin.pairs.config import PairConfig
from megatron_spin.reward.config import RewardConfig
from megatron_spin.spec.precision import FP8Settings
from megatron_spin.sync.config import SyncConfig
from megatron_spin.train.config import OptimConfig


def composed(*overrides):
    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        return compose(config_name="spin_trainer", overrides=list(overrides))


def test_default_config_is_the_packaged_cpu_run():
    cfg = load_run_config(composed())
    assert cfg.data.train_files == ("packaged:movie_reviews/train",)
    assert cfg.data.val_files == ("packaged:movie_reviews/val",)
    assert cfg.actor_rollout_ref.model.path == "packaged:smollm2" and cfg.reward_model.type == "vader"
    assert cfg.rollout.engine == "embedded" and cfg.trainer.n_gpus_per_node == 0 and cfg.trainer.cpu_ranks == 0
    assert cfg.actor.precision.params_dtype == "float32" and cfg.actor.precision.fp8 is None
    assert cfg.trainer.default_local_dir == "runs/megatron_spin/default_cpu"  # interpolation resolved
    assert to_dict(cfg)["actor_rollout_ref"]["actor"]["optim"]["lr"] == 1e-5
    assert to_dict(cfg)["actor_rollout_ref"]["rollout"]["sync"]["transport"] == "tensor"  # enums as their values


def test_overrides_reach_the_typed_records():
    cfg = load_run_config(composed(
        "actor_rollout_ref.actor.tp=2", "trainer.total_training_steps=2", "algorithm.spin=true",
        "actor_rollout_ref.rollout.n=1", "trainer.logger=[jsonl,tensorboard]", "trainer.experiment_name=x",
        "actor_rollout_ref.actor.optim.lr=1e-5", "data.train_files=[a.jsonl,b.parquet]"))
    assert cfg.actor.tp == 2 and cfg.trainer.total_training_steps == 2 and cfg.algorithm.spin
    assert cfg.trainer.logger == ("jsonl", "tensorboard") and cfg.trainer.default_local_dir.endswith("/x")
    assert cfg.actor.optim.lr == 1e-5 and cfg.data.train_files == ("a.jsonl", "b.parquet")


def test_overrides_reach_the_component_records():
    cfg = load_run_config(composed(
        "algorithm.loss.loss_type=ipo", "algorithm.loss.beta=[0.5,0.2]", "algorithm.pairs.strategy=all_pairs",
        "algorithm.pairs.min_margin=0.25", "actor_rollout_ref.actor.precision.params_dtype=bfloat16",
        "actor_rollout_ref.rollout.sync.load_format=null", "actor_rollout_ref.rollout.sync.verify_tolerance=0.5",
        "actor_rollout_ref.actor.tp=2", "trainer.cpu_ranks=4"))
    assert isinstance(cfg.algorithm.loss, LossConfig) and isinstance(cfg.algorithm.pairs, PairConfig)
    assert (cfg.algorithm.loss.loss_type, cfg.algorithm.loss.beta) == ("ipo", (0.5, 0.2))
    assert (cfg.algorithm.pairs.strategy, cfg.algorithm.pairs.min_margin) == ("all_pairs", 0.25)
    assert cfg.actor.precision.params_dtype == "bfloat16"
    assert cfg.rollout.sync.load_format is None and cfg.rollout.sync.verify_tolerance == 0.5
    assert cfg.trainer.cpu_ranks == 4


@pytest.mark.parametrize("override,message", [
    ("+data.max_prompt_lenght=3", r"data\.max_prompt_lenght: unknown key"),
    ("actor_rollout_ref.actor.tp=two", r"actor_rollout_ref\.actor\.tp: expected int, got 'two'"),
    ("actor_rollout_ref.actor.tp=0", r"actor_rollout_ref\.actor\.tp: must be >= 1, got 0"),
    ("actor_rollout_ref.actor.optim.lr=-1", r"actor_rollout_ref\.actor\.optim\.lr: must be > 0, got -1\.0"),
    ("actor_rollout_ref.rollout.n=1", r"actor_rollout_ref\.rollout\.n: online DPO needs n >= 2"),
    ("actor_rollout_ref.rollout.engine=sglang", r"actor_rollout_ref\.rollout\.engine: sglang needs GPUs"),
    ("actor_rollout_ref.rollout.sync.transport=pigeon",
     r"actor_rollout_ref\.rollout\.sync\.transport: one of tensor, disk, distributed, shared; got 'pigeon'"),
    ("actor_rollout_ref.rollout.sync.bucket_mb=-1",
     r"actor_rollout_ref\.rollout\.sync\.bucket_mb: must be >= 0, got -1\.0"),
    ("actor_rollout_ref.rollout.sync.load_format=direct",
     r"actor_rollout_ref\.rollout\.sync\.load_format: one of null, flattened_bucket; got 'direct'"),
    ("actor_rollout_ref.rollout.sync.group_timeout_s=0",
     r"actor_rollout_ref\.rollout\.sync\.group_timeout_s: must be > 0, got 0\.0"),
    ("actor_rollout_ref.rollout.sync.verify_every=-2",
     r"actor_rollout_ref\.rollout\.sync\.verify_every: must be >= 0, got -2"),
    ("actor_rollout_ref.rollout.sync.verify_tolerance=0",
     r"actor_rollout_ref\.rollout\.sync\.verify_tolerance: must be > 0, got 0\.0"),
    ("actor_rollout_ref.rollout.tp_size=2", r"actor_rollout_ref\.rollout\.tp_size: the embedded engine"),
    ("actor_rollout_ref.rollout.tp_size=0", r"actor_rollout_ref\.rollout\.tp_size: must be >= 1, got 0"),
    ("actor_rollout_ref.model.path=null", r"actor_rollout_ref\.model\.path: required"),
    ("algorithm.loss.loss_type=kto", r"algorithm\.loss\.loss_type: one of sigmoid, ipo, hinge, simpo; got 'kto'"),
    ("algorithm.loss.beta=0", r"algorithm\.loss\.beta: beta must be finite and > 0, got 0\.0"),
    ("algorithm.loss.beta=[0.1,-1]", r"algorithm\.loss\.beta: beta\[1\] must be finite and > 0, got -1\.0"),
    ("algorithm.loss.label_smoothing=0.5", r"algorithm\.loss\.label_smoothing: must be in \[0, 0\.5\), got 0\.5"),
    ("algorithm.pairs.strategy=random", r"algorithm\.pairs\.strategy: one of best_vs_worst, all_pairs; got 'random'"),
    ("algorithm.pairs.min_margin=-1", r"algorithm\.pairs\.min_margin: must be >= 0, got -1\.0"),
    ("+algorithm.dpo_beta=0.1", r"algorithm\.dpo_beta: unknown key"),  # the keys before algorithm.loss/pairs
    ("+algorithm.pair_strategy=all_pairs", r"algorithm\.pair_strategy: unknown key"),
    ("reward_model.type=hf", r"reward_model\.path: required with type=hf"),
    ("trainer.logger=[console,mlflow]",
     r"trainer\.logger\[1\]: one of console, jsonl, tensorboard, wandb; got 'mlflow'"),
    ("trainer.total_training_steps=0", r"trainer\.total_training_steps: must be >= 1, got 0"),
    ("trainer.nnodes=2", r"trainer\.ray_address: a run on trainer\.nnodes=2 nodes joins a Ray cluster"),
    ("trainer.cpu_ranks=-1", r"trainer\.cpu_ranks: must be >= 0, got -1"),
    ("trainer.save_freq=-2", r"trainer\.save_freq: must be >= 1 \(every N steps\), 0 \(at the end\) or -1 \(never\), got -2"),
    ("data.train_files=[]", r"data\.train_files: give prompt files"),
    ("actor_rollout_ref.actor.precision=bf16", r"actor_rollout_ref\.actor\.precision: expected a section, got 'bf16'"),
    ("actor_rollout_ref.actor.precision.params_dtype=bf16",
     r"actor_rollout_ref\.actor\.precision\.params_dtype: one of float32, bfloat16, float16; got 'bf16'"),
    ("actor_rollout_ref.actor.precision.fp8={format:hybrid}",
     r"actor_rollout_ref\.actor\.precision\.fp8: FP8 needs TransformerEngine"),
    ("actor_rollout_ref.actor.precision.fp8={recipe:fast}",
     r"actor_rollout_ref\.actor\.precision\.fp8\.recipe: one of delayed, tensorwise, blockwise, mxfp8; got 'fast'"),
    ("actor_rollout_ref.actor.precision.fp8={amax_history_len:0}",
     r"actor_rollout_ref\.actor\.precision\.fp8\.amax_history_len: must be >= 1, got 0"),
])
def test_bad_values_are_refused_at_start_up_naming_the_key(override, message):
    with pytest.raises(ConfigError, match="^" + message):
        load_run_config(composed(override))


def test_cross_section_rules_name_the_full_key():
    with pytest.raises(ConfigError, match=r"^trainer\.cpu_ranks: a multiple of TP\*PP=2 .*got 3") as info:
        load_run_config(composed("actor_rollout_ref.actor.tp=2", "trainer.cpu_ranks=3"))
    assert info.value.key == "trainer.cpu_ranks"
    with pytest.raises(ConfigError, match=r"^trainer\.cpu_ranks: is for CPU runs") as info:
        load_run_config(composed("trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang",
                                 "trainer.cpu_ranks=2"))
    assert info.value.key == "trainer.cpu_ranks"


def test_fp8_keys_map_onto_the_model_precision():
    cfg = load_run_config(composed("trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang",
                                   "actor_rollout_ref.actor.precision.params_dtype=bfloat16",
                                   "actor_rollout_ref.actor.precision.fp8={format:e4m3,recipe:blockwise,"
                                   "amax_history_len:16}"))
    assert isinstance(cfg.actor.precision.fp8, FP8Settings)
    kw = cfg.actor.precision.transformer_config_kwargs()
    assert kw["bf16"] and kw["fp8"] == "e4m3" and kw["fp8_recipe"] == "blockwise" and kw["fp8_amax_history_len"] == 16
    assert load_run_config(composed()).actor.precision.fp8 is None


def preset(name, *overrides):
    with initialize_config_module(config_module="megatron_spin.config.conf", version_base=None):
        return compose(config_name=name, overrides=list(overrides))


SITE = ("actor_rollout_ref.model.path=/models/llama", "data.train_files=[/data/p.jsonl]", "reward_model.path=/models/rm",
        "trainer.ray_address=head:6379")


@pytest.mark.parametrize("name,tp,pp,nodes", [("spin_8b", 2, 2, 1), ("spin_70b", 8, 4, 8)])
def test_gpu_presets_validate_once_site_keys_are_given(name, tp, pp, nodes):
    cfg = load_run_config(preset(name, *SITE))
    assert (cfg.actor.tp, cfg.actor.pp, cfg.trainer.nnodes, cfg.trainer.n_gpus_per_node) == (tp, pp, nodes, 8)
    assert cfg.rollout.engine == "sglang" and cfg.actor.precision.params_dtype == "bfloat16"
    assert cfg.actor.optim.use_distributed_optimizer
    assert cfg.rollout.sync.dtype == "bfloat16"
    assert cfg.data.train_files == ("/data/p.jsonl",) and cfg.actor_rollout_ref.model.path == "/models/llama"


@pytest.mark.parametrize("missing,message", [
    ("actor_rollout_ref.model.path", r"actor_rollout_ref\.model\.path: required"),
    ("data.train_files", r"data\.train_files: give prompt files"),
    ("reward_model.path", r"reward_model\.path: required with type=hf"),
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
    (("actor_rollout_ref.rollout.quantization=int4",),
     r"actor_rollout_ref\.rollout\.quantization: one of fp8, null; got 'int4'"),
    (("actor_rollout_ref.rollout.quantization=fp8",),
     r"actor_rollout_ref\.rollout\.quantization: only SGLang engines quantise"),
    (("actor_rollout_ref.rollout.quantization=fp8", "actor_rollout_ref.rollout.sync.dtype=float32",
      "actor_rollout_ref.rollout.engine=sglang", "trainer.n_gpus_per_node=8"),
     r"actor_rollout_ref\.rollout\.sync\.dtype: an FP8-serving engine quantises what it receives"),
])
def test_rollout_quantization_rules(overrides, message):
    with pytest.raises(ConfigError, match="^" + message):
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
                           "actor_rollout_ref.actor.precision.fp8={format: hybrid, recipe: delayed}",
                           f"trainer.default_local_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode != 0
    assert ("config error: actor_rollout_ref.actor.precision.fp8: FP8 needs TransformerEngine on CUDA GPUs"
            in done.stderr), done.stderr
    # Refused before the run wrote anything (Hydra itself creates the directory and its empty log).
    run = tmp_path / "run"
    assert not run.exists() or {p.name for p in run.iterdir()} <= {"main.log"}


def test_a_missing_value_that_another_key_interpolates_is_named_not_a_crash():
    with pytest.raises(ConfigError, match=r"trainer\.experiment_name: required"):
        load_run_config(composed("trainer.experiment_name=???"))


# -- keys: records name their own field, the loader anchors it ----------------------------------------
def _nested(path: str, leaf: dict) -> dict:
    """``{"a": {"b": leaf}}`` for path ``a.b``: a config tree that sets only ``leaf`` there."""
    tree = leaf
    for part in reversed(path.split(".")):
        tree = {part: tree}
    return tree


@pytest.mark.parametrize("path,record,kwargs,key", [
    ("actor_rollout_ref.actor.optim", OptimConfig, dict(lr=-1.0), "lr"),
    ("actor_rollout_ref.actor.precision.fp8", FP8Settings, dict(amax_history_len=0), "amax_history_len"),
    ("actor_rollout_ref.rollout.sync", SyncConfig, dict(verify_tolerance=0.0), "verify_tolerance"),
    ("algorithm.loss", LossConfig, dict(label_smoothing=0.7), "label_smoothing"),
    ("algorithm.pairs", PairConfig, dict(min_margin=-1.0), "min_margin"),
    ("reward_model", RewardConfig, dict(type="hf"), "path"),
    ("data", DataConfig, dict(train_files=[]), "train_files"),
    ("trainer", TrainerConfig, dict(nnodes=2), "ray_address"),
])
def test_a_record_built_inside_a_section_reports_the_full_dotted_key(path, record, kwargs, key):
    # Built on its own, the record names its field relative to itself ...
    with pytest.raises(ConfigError) as own:
        record(**{k: tuple(v) if isinstance(v, list) else v for k, v in kwargs.items()})
    assert own.value.key == key and str(own.value) == f"{key}: {own.value.reason}"
    # ... read from its section, the same rule is reported under the full dotted key.
    with pytest.raises(ConfigError) as loaded:
        load_run_config(_nested(path, kwargs))
    assert loaded.value.key == f"{path}.{key}"
    assert loaded.value.reason == own.value.reason
    assert str(loaded.value) == f"{path}.{key}: {own.value.reason}"


def test_config_error_under_prefixes_the_key():
    err = ConfigError("lr", "must be > 0, got -1")
    assert str(err) == "lr: must be > 0, got -1"
    anchored = err.under("actor_rollout_ref.actor.optim")
    assert isinstance(anchored, ConfigError) and anchored.reason == err.reason
    assert str(anchored) == "actor_rollout_ref.actor.optim.lr: must be > 0, got -1"
    assert anchored.under("outer").key == "outer.actor_rollout_ref.actor.optim.lr"  # anchors compose
    assert err.under("") is err  # the root section adds nothing
    # A record's own dotted key (RolloutConfig names sync.dtype) keeps its tail under the section.
    with pytest.raises(ConfigError) as info:
        load_run_config(composed("actor_rollout_ref.rollout.quantization=fp8",
                                 "actor_rollout_ref.rollout.engine=sglang", "trainer.n_gpus_per_node=8",
                                 "actor_rollout_ref.rollout.sync.dtype=float32"))
    assert info.value.key == "actor_rollout_ref.rollout.sync.dtype"


def _record_field(key: str) -> tuple[type, str]:
    """The record class and field a dotted key of the run config lands in."""
    cls = RunConfig
    *sections, name = key.split(".")
    for part in sections:
        tp = typing.get_type_hints(cls)[part]
        (cls,) = [a for a in (tp, *typing.get_args(tp)) if dataclasses.is_dataclass(a)]  # through Optional
    return cls, name


ENUM_KEYS = [
    # (dotted key, bad value, the choices the error lists)
    ("actor_rollout_ref.rollout.engine", "vllm", "embedded, sglang"),
    ("actor_rollout_ref.rollout.placement", "split", "colocated, disaggregated"),
    ("actor_rollout_ref.rollout.quantization", "int4", "fp8, null"),
    ("actor_rollout_ref.rollout.sync.transport", "pigeon", "tensor, disk, distributed, shared"),
    ("actor_rollout_ref.rollout.sync.dtype", "fp8", "float32, bfloat16, float16, null"),
    ("actor_rollout_ref.actor.precision.params_dtype", "bf16", "float32, bfloat16, float16"),
    ("actor_rollout_ref.actor.optim.optimizer", "adamw", "adam, sgd"),
    ("actor_rollout_ref.actor.optim.lr_decay_style", "exponential", "constant, cosine, linear"),
    ("algorithm.loss.loss_type", "kto", "sigmoid, ipo, hinge, simpo"),
    ("algorithm.pairs.strategy", "random", "best_vs_worst, all_pairs"),
    ("algorithm.pairs.spin_selection", "some", "all, first"),
    ("reward_model.type", "nope", "vader, math, hf, http, function"),
    ("trainer.logger", "mlflow", "console, jsonl, tensorboard, wandb"),
]


@pytest.mark.parametrize("key,bad,choices", ENUM_KEYS)
def test_every_enum_key_refuses_a_bad_value_naming_the_key_and_the_choices(key, bad, choices):
    rule = f"one of {choices}; got {bad!r}"
    # From the command line: the full dotted key (a list's entry by its index).
    listed = key == "trainer.logger"
    with pytest.raises(ConfigError) as info:
        load_run_config(composed(f"{key}=[console,{bad}]" if listed else f"{key}={bad}"))
    full_key = f"{key}[1]" if listed else key
    assert info.value.key == full_key
    assert str(info.value) == f"{full_key}: {rule}"
    # Built in code: the record names its own field, with the same rule.
    cls, name = _record_field(key)
    with pytest.raises(ConfigError) as info:
        cls(**{name: ("console", bad) if listed else bad})
    assert info.value.key == name
    assert str(info.value) == f"{name}: {rule}"


def test_fp8_enum_keys_refuse_a_bad_value_naming_the_key_and_the_choices():
    for field, bad, choices in [("format", "e5m2", "e4m3, hybrid"),
                                ("recipe", "fast", "delayed, tensorwise, blockwise, mxfp8"),
                                ("amax_compute_algo", "mean", "max, most_recent")]:
        key = f"actor_rollout_ref.actor.precision.fp8.{field}"
        with pytest.raises(ConfigError, match=re.escape(f"{key}: one of {choices}; got {bad!r}")) as info:
            load_run_config(composed(f"actor_rollout_ref.actor.precision.fp8={{{field}:{bad}}}"))
        assert info.value.key == key


@pytest.mark.parametrize("save_freq, saved", [(0, [5]), (2, [2, 4, 5]), (5, [5]), (-1, [])])
def test_checkpoint_steps_follow_save_freq(save_freq, saved):
    from megatron_spin.config.run import TrainerConfig

    t = TrainerConfig(total_training_steps=5, save_freq=save_freq)
    assert [s for s in range(1, 6) if t.saves_after(s, stopping=False)] == saved
    assert t.saves_after(3, stopping=True)  # a requested stop always saves, -1 included


SHARED = "actor_rollout_ref.rollout.sync.transport=shared"


def test_shared_transport_is_accepted_for_one_cpu_rank_and_places_no_engine_actor():
    from megatron_spin.driver.preflight import plan_placement

    cfg = load_run_config(composed(SHARED))
    placement = plan_placement(cfg)
    assert cfg.rollout.sync.transport == "shared" and placement.engines_in_ranks
    assert placement.bundles() == [{"CPU": 1}]  # the rank; its engine lives inside it


@pytest.mark.parametrize("overrides, key, rule", [
    (["actor_rollout_ref.actor.tp=3"], "actor_rollout_ref.rollout.sync.transport", "one trainer rank"),
    (["trainer.cpu_ranks=2"], "actor_rollout_ref.rollout.sync.transport", "one trainer rank"),
    (["actor_rollout_ref.rollout.num_engines=2"], "actor_rollout_ref.rollout.sync.transport", "one engine colocated"),
    (["actor_rollout_ref.rollout.placement=disaggregated"], "actor_rollout_ref.rollout.sync.transport",
     "one engine colocated"),
    (["actor_rollout_ref.rollout.sync.dtype=bfloat16"], "actor_rollout_ref.rollout.sync.dtype", "must be null"),
    (["actor_rollout_ref.rollout.threads=2"], "actor_rollout_ref.rollout.threads", "the rank's torch threads"),
    (["trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang"],
     "actor_rollout_ref.rollout.sync.transport", "on the CPU"),
])
def test_shared_transport_rules_name_the_key(overrides, key, rule):
    with pytest.raises(ConfigError, match=rule) as info:
        load_run_config(composed(SHARED, *overrides))
    assert info.value.key == key


NO_RAY = "trainer.use_ray=false"


def test_without_ray_is_accepted_for_one_cpu_rank_with_any_transport_that_fits_one():
    for extra in ([], [SHARED], ["actor_rollout_ref.rollout.sync.transport=disk"]):
        cfg = load_run_config(composed(NO_RAY, *extra))
        assert cfg.trainer.use_ray is False and not cfg.uses_ray


@pytest.mark.parametrize("overrides, uses_ray", [
    ([], False),  # the default: one CPU rank, a rule reward
    ([SHARED], False),
    (["trainer.use_ray=true"], True),
    (["actor_rollout_ref.actor.tp=2"], True),
    (["trainer.cpu_ranks=2"], True),
    (["trainer.ray_address=auto"], True),
    (["reward_model.type=hf", "reward_model.path=/nonexistent"], True),
    (["trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang",
      "actor_rollout_ref.rollout.sync.transport=disk"], True),
])
def test_ray_places_the_workers_by_default_only_where_a_run_needs_it(overrides, uses_ray):
    cfg = load_run_config(composed(*overrides))
    assert cfg.uses_ray is uses_ray


@pytest.mark.parametrize("overrides, key, rule", [
    (["actor_rollout_ref.actor.tp=3"], "trainer.use_ray", "one trainer rank"),
    (["trainer.cpu_ranks=2"], "trainer.use_ray", "one trainer rank"),
    (["trainer.n_gpus_per_node=8", "actor_rollout_ref.rollout.engine=sglang",
      "actor_rollout_ref.rollout.sync.transport=disk"], "trainer.use_ray", "one CPU rank runs inside the driver"),
    (["trainer.ray_address=auto"], "trainer.use_ray", "no cluster to join"),
    (["reward_model.type=hf", "reward_model.path=/nonexistent"], "trainer.use_ray", "HF reward model"),
])
def test_without_ray_rules_name_the_key(overrides, key, rule):
    with pytest.raises(ConfigError, match=rule) as info:
        load_run_config(composed(NO_RAY, *overrides))
    assert info.value.key == key
