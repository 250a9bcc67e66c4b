"""Start-up rules that need the model's config or the placement: refused before anything starts,
naming the keys and the rule (``driver.preflight``), and before a first-time model conversion."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from megatron_spin.config.run import load_run_config
from megatron_spin.driver.preflight import check_run, max_pairs_per_prompt, plan_placement
from megatron_spin.errors import ConfigError
from megatron_spin.spec.arch import arch_from_hf_dir
from tests.conftest import make_tiny_hf
from tests.unit.test_run_config import composed


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    hf = make_tiny_hf(tmp_path_factory.mktemp("preflight") / "hf", "llama", layers=2)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))  # the preset's 128 + 32 fit
    return hf


def check(tiny, *overrides):
    cfg = load_run_config(composed(f"actor_rollout_ref.model.path={tiny}", *overrides))
    check_run(cfg, arch_from_hf_dir(tiny), plan_placement(cfg))


def test_a_sound_config_passes(tiny):
    check(tiny, "data.train_batch_size=2", "trainer.cpu_ranks=2", "actor_rollout_ref.actor.micro_pairs=1")


@pytest.mark.parametrize("overrides,message", [
    (("actor_rollout_ref.actor.pp=4",),
     r"^actor_rollout_ref\.actor: tp=1, pp=4, vpp=None, ep=1 for .*: rule num_layers % PP == 0 violated"),
    (("data.max_prompt_length=2000", "data.max_response_length=100"),
     r"^data: max_prompt_length \+ max_response_length = 2000 \+ 100 = 2100 is more than .*'s context of 256 "
     r"tokens \(max_position_embeddings\)"),
    # 2 DP ranks × 2 pairs per micro-batch = 4 pairs, but 3 prompts make at most 3 (best vs worst).
    (("data.train_batch_size=3", "trainer.cpu_ranks=2", "actor_rollout_ref.actor.micro_pairs=2"),
     r"^data\.train_batch_size: 3 prompts make at most 3 pair\(s\) per step, fewer than one micro-batch on every "
     r"data-parallel rank \(DP 2 × actor_rollout_ref\.actor\.micro_pairs 2 = 4\)"),
    (("reward_model.type=function", "reward_model.function=no_such_module_xyz:score"),
     r"^reward_model\.function: reward function 'no_such_module_xyz:score': cannot import 'no_such_module_xyz'"),
    (("reward_model.type=function", "reward_model.function=tests.unit.test_preflight:not_here"),
     r"^reward_model\.function: .*has no callable 'not_here'"),
])
def test_rules_that_need_the_model_or_the_placement(tiny, overrides, message):
    with pytest.raises(ConfigError, match=message):
        check(tiny, *overrides)


def test_moe_rules_on_cpu_ranks(tmp_path):
    """A MoE model: EP must divide the experts and DP; TP > 1 cannot train on CPU ranks (no TE, so no
    sequence parallelism) and is refused naming actor.tp and the way out, before anything starts."""
    hf = make_tiny_hf(tmp_path / "hf", "qwen3_moe", layers=2)
    config = json.loads((hf / "config.json").read_text())
    (hf / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 256}))
    base = ("data.train_batch_size=4", "actor_rollout_ref.actor.micro_pairs=1")
    check(hf, *base, "trainer.cpu_ranks=2", "actor_rollout_ref.actor.ep=2")  # sound
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.actor\.tp: rule MoE training at TP > 1 needs "
                                          r"sequence parallelism violated: TP=2 on CPU trainer ranks.*use TP=1 and split "
                                          r"the experts with EP"):
        check(hf, *base, "trainer.cpu_ranks=4", "actor_rollout_ref.actor.tp=2", "actor_rollout_ref.actor.ep=2")
    with pytest.raises(ConfigError, match=r"rule DP % EP == 0 violated: DP=2 .*EP=4"):
        check(hf, *base, "trainer.cpu_ranks=2", "actor_rollout_ref.actor.ep=4")
    with pytest.raises(ConfigError, match=r"rule num_experts % EP == 0 violated: 4 experts, EP=3"):
        check(hf, *base, "trainer.cpu_ranks=3", "actor_rollout_ref.actor.ep=3")


def test_pairs_per_prompt_follow_the_pairing_rule(tiny):
    def most(*o):
        return max_pairs_per_prompt(load_run_config(composed("actor_rollout_ref.rollout.n=4", *o)))

    assert most() == 1  # best vs worst
    assert most("algorithm.pairs.strategy=all_pairs") == 6
    assert most("algorithm.spin=true") == 1 and most("algorithm.spin=true", "algorithm.pairs.spin_selection=all") == 4
    # all_pairs: 3 prompts × 6 pairs can fill 2 × 2, so the batch rule lets it through.
    check(tiny, "data.train_batch_size=3", "trainer.cpu_ranks=2", "actor_rollout_ref.actor.micro_pairs=2",
          "actor_rollout_ref.rollout.n=4", "algorithm.pairs.strategy=all_pairs")


@pytest.mark.parametrize("url", ["ftp://scorer/score", "scorer:8000/score", "file:///etc/passwd"])
def test_a_reward_url_must_be_http(url):
    with pytest.raises(ConfigError, match=r"^reward_model\.url: an http:// or https:// URL with a host"):
        load_run_config(composed("reward_model.type=http", f"reward_model.url={url}"))
    load_run_config(composed("reward_model.type=http", "reward_model.url=https://scorer:8000/score"))


def test_a_bad_layout_is_refused_before_a_first_conversion(tiny, tmp_path):
    cache = tmp_path / "cache"
    done = subprocess.run([sys.executable, "-m", "megatron_spin.main", f"actor_rollout_ref.model.path={tiny}",
                           "actor_rollout_ref.actor.tp=3", f"trainer.default_local_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "MEGATRON_SPIN_CACHE": str(cache)})
    assert done.returncode != 0
    assert "config error: actor_rollout_ref.actor: tp=3" in done.stderr and "% TP == 0 violated" in done.stderr, \
        done.stderr
    assert "converting" not in done.stdout and not (cache / "megatron").exists()  # nothing converted


def test_a_data_error_is_one_line_not_a_traceback(tiny, smollm2_dir, tmp_path):
    from megatron_spin.convert.hf_io import copy_side_files

    copy_side_files(smollm2_dir, tiny, names=("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"))
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    done = subprocess.run([sys.executable, "-m", "megatron_spin.main", f"actor_rollout_ref.model.path={tiny}",
                           f"data.train_files=[{bad}]", "data.val_files=[]",
                           f"trainer.default_local_dir={tmp_path / 'run'}"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "MEGATRON_SPIN_CACHE": str(tmp_path / "cache")})
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == f"data error: {bad}:2: not UTF-8 text (byte 0xe9 at column 16); " \
                                                   "save the file as UTF-8", done.stderr
    assert "Traceback" not in done.stderr


def test_a_model_path_without_a_config_or_an_unsupported_model_is_a_config_error(tmp_path):
    from megatron_spin.convert.prepare import locate_model, model_arch

    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.model\.path: .*: no config\.json"):
        locate_model(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.model\.path: .*GPT2LMHeadModel"):
        model_arch(locate_model(str(tmp_path)))
    with pytest.raises(ConfigError, match=r"^actor_rollout_ref\.model\.megatron_dir: .*not a Megatron checkpoint"):
        locate_model(str(tmp_path), str(tmp_path / "none"))
