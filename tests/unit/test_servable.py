"""What ``megatron-spin-serve PATH`` serves for each kind of path, and the errors that name the path.

Exports of real checkpoints are covered end to end in tests/e2e/test_serve.py; here the
resolution rules, on directories laid out as the trainer lays them out.
"""

from __future__ import annotations

import json

import pytest

from megatron_spin.ckpt import run_state
from megatron_spin.ckpt.metadata import SPIN_METADATA
from megatron_spin.convert.servable import NotServable, resolve_servable
from megatron_spin.rollout.launcher import EngineKind
from megatron_spin.serve import choose_engine


def test_an_hf_directory_is_served_as_it_is(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    got = resolve_servable(str(tmp_path))
    assert got.hf_dir == tmp_path and got.name == tmp_path.name


def test_paths_that_hold_nothing_servable_are_named(tmp_path):
    with pytest.raises(NotServable, match=f"{tmp_path / 'nope'}: no such file"):
        resolve_servable(str(tmp_path / "nope"))
    with pytest.raises(NotServable, match="not a run directory .* an HF model directory"):
        resolve_servable(str(tmp_path))
    run_state.checkpoints_root(tmp_path).mkdir()  # a run that has not saved yet
    with pytest.raises(NotServable, match="without a complete checkpoint yet"):
        resolve_servable(str(tmp_path))


def test_weights_without_the_model_identity_are_refused_before_any_export(tmp_path):
    ckpt = run_state.checkpoints_root(tmp_path / "run") / "step_00000003"
    (ckpt / run_state.ACTOR_SUBDIR).mkdir(parents=True)
    (ckpt / run_state.STATE_FILE).write_text(json.dumps({"step": 3}))
    (ckpt.parent / "latest").write_text(ckpt.name + "\n")
    for path in (tmp_path / "run", ckpt):
        with pytest.raises(NotServable, match=f"{SPIN_METADATA} and hf/config.json"):
            resolve_servable(str(path))
    assert not (tmp_path / "run" / "exports").exists()


def test_auto_engine_is_sglang_only_with_cuda_and_sglang():
    import importlib.util

    import torch

    gpu = torch.cuda.is_available() and importlib.util.find_spec("sglang") is not None
    assert choose_engine("auto") == (EngineKind.SGLANG if gpu else EngineKind.EMBEDDED)
    assert choose_engine("sglang") == EngineKind.SGLANG


def test_a_checkpoint_saved_without_identity_gets_it_from_the_model_its_run_started_from(tmp_path):
    from megatron_spin.convert.servable import _has_identity, _restore_identity

    hf, source = tmp_path / "hf_model", tmp_path / "converted"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (source / "hf").mkdir(parents=True)
    for f in ("metadata.json", SPIN_METADATA, "hf/config.json"):
        (source / f).write_text("{}")
    run = tmp_path / "run"
    actor = run_state.checkpoints_root(run) / "step_00000002" / run_state.ACTOR_SUBDIR
    actor.mkdir(parents=True)
    (actor / "metadata.json").write_text("{}")
    logged = []
    _restore_identity(actor, logged.append)  # no config.json: not a run's checkpoint, nothing copied
    assert not _has_identity(actor) and not logged
    (run / "config.json").write_text(json.dumps({"actor_rollout_ref": {"model": {"path": str(hf),
                                                                                 "megatron_dir": str(source)}}}))
    _restore_identity(actor, logged.append)
    assert _has_identity(actor) and str(source) in logged[0]
