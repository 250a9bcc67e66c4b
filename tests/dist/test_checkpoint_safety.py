"""Loading a crafted checkpoint runs none of its code, on every load path of the project.

A real training state (actor, DistributedOptimizer state, RNG; one gloo rank) and a converted
model are saved, then copies get one piece made to run code (``tests/crafted_checkpoint.py``:
the piece still unpickles to what it held, so a loader that runs it carries on silently and
leaves a marker file).  Model weights (``load_model_weights``), resume (``load_train_state``)
and the export tool (``tools/convert_megatron_to_hf.py``) must each refuse with
``UnsafeCheckpointError`` naming the file, and no marker may appear; the untouched state must
still load bit-exactly.  Every load runs with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``, which
turns torch.load's weights-only default off wherever a caller relies on the default.

The ranks report a refusal's class name and message instead of importing the error type, so
the same test, run against code without the safe loader, fails on its assertions (markers
created, loads succeeding) rather than on an import.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from megatron_spin.parallel.launch import launch
from tests.conftest import LAUNCH_TIMEOUT
from tests.crafted_checkpoint import RunsCode, bytes_keys, poison_common, poison_index, poison_item, tensor_keys
from tests.dist.test_convert_tools import run_tool

pytestmark = [pytest.mark.dist, pytest.mark.timeout(900)]


def _optim():
    from megatron_spin.train.config import OptimConfig

    return OptimConfig(lr=1e-3, use_distributed_optimizer=True)


def _params(modules) -> list[torch.Tensor]:
    return [p.detach().clone() for m in modules for p in m.parameters()]


def _save_state(rank, world_size, ckpt, where):
    """The actor (seeded optimizer state, as before a first update) saved as a training state."""
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.checkpoint import save_train_state

    pctx = init_parallel(ParallelLayout())
    actor = Actor.build(read_arch(ckpt), pctx, _optim(), LossConfig(), init_from=ckpt)
    with torch.no_grad():  # weights unlike the converted model's, so a load that did nothing shows
        for p in actor.modules[0].parameters():
            p.add_(0.5)
    save_train_state(actor, None, where)
    return _params(actor.modules)


def _try_loads(rank, world_size, ckpt, cases):
    """Each (name, kind, directory) loaded as the project loads it: ("refused", error class,
    message), ("loaded", params) or ("failed", error class, message)."""
    from megatron_spin.ckpt.metadata import read_arch
    from megatron_spin.ckpt.model_io import load_model_weights
    from megatron_spin.loss.config import LossConfig
    from megatron_spin.models.builder import build_model
    from megatron_spin.parallel.groups import init_parallel
    from megatron_spin.parallel.layout import ParallelLayout
    from megatron_spin.train.actor import Actor
    from megatron_spin.train.checkpoint import load_train_state

    arch = read_arch(ckpt)
    pctx = init_parallel(ParallelLayout())
    out = {}
    for name, kind, where in cases:
        try:
            if kind == "weights":
                chunks = build_model(arch, pctx, init_weights=False)
                load_model_weights(chunks, where)
                out[name] = ("loaded", _params(chunks))
            else:
                actor = Actor.build(arch, pctx, _optim(), LossConfig(), init_from=ckpt)
                load_train_state(actor, None, where)
                out[name] = ("loaded", _params(actor.modules))
        except Exception as exc:  # noqa: BLE001 - reported by class name (see the module docstring)
            out[name] = ("refused" if type(exc).__name__ == "UnsafeCheckpointError" else "failed",
                         type(exc).__name__, str(exc)[:2000])
    return out


@pytest.fixture(scope="module")
def saved(tiny_ckpt, tmp_path_factory):
    root = tmp_path_factory.mktemp("safety")
    (params,) = launch(_save_state, 1, (tiny_ckpt, root / "state"), timeout=LAUNCH_TIMEOUT)
    return root / "state", params


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_crafted_checkpoints_are_refused_on_every_load_path(saved, tiny_ckpt, tmp_path, monkeypatch):
    state, saved_params = saved
    marks = tmp_path / "markers"
    marks.mkdir()
    assert bytes_keys(state / "actor") and bytes_keys(state / "optim")  # ShardedObjects are stored as bytes items
    crafted = {}  # case -> the file that must be named

    actor = _copy(state / "actor", tmp_path / "w-index")
    poison_index(actor, marks / "w-index")
    crafted["w-index"] = ("weights", actor, actor / ".metadata")
    actor = _copy(state / "actor", tmp_path / "w-common")
    poison_common(actor, marks / "w-common")
    crafted["w-common"] = ("weights", actor, actor / "common.pt")
    actor = _copy(state / "actor", tmp_path / "w-object")
    file = poison_item(actor, bytes_keys(actor)[0], marks / "w-object")
    crafted["w-object"] = ("weights", actor, file)
    resume = _copy(state, tmp_path / "r-index")
    poison_index(resume / "optim", marks / "r-index")
    crafted["r-index"] = ("resume", resume, resume / "optim" / ".metadata")
    resume = _copy(state, tmp_path / "r-object")
    file = poison_item(resume / "optim", bytes_keys(resume / "optim")[0], marks / "r-object")
    crafted["r-object"] = ("resume", resume, file)
    resume = _copy(state, tmp_path / "r-common")
    poison_common(resume / "optim", marks / "r-common")
    crafted["r-common"] = ("resume", resume, resume / "optim" / "common.pt")
    resume = _copy(state, tmp_path / "r-rng")
    rng = resume / "rng" / "rank_00000.pt"
    torch.save({"state": torch.get_rng_state(), "x": RunsCode(marks / "r-rng")}, rng)
    crafted["r-rng"] = ("resume", resume, rng)

    cases = [(name, kind, str(where)) for name, (kind, where, _) in crafted.items()]
    cases += [("clean-weights", "weights", str(state / "actor")), ("clean-resume", "resume", str(state))]
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    (results,) = launch(_try_loads, 1, (tiny_ckpt, cases), timeout=LAUNCH_TIMEOUT)

    ran = sorted(m.name for m in marks.iterdir())
    assert not ran, f"crafted checkpoints ran code while loading: {ran}"
    for name, (kind, where, named) in crafted.items():
        outcome = results[name]
        assert outcome[0] == "refused", (name, outcome[:1], outcome[1:] if outcome[0] != "loaded" else "")
        assert str(named) in outcome[2], (name, outcome[2])
        if "index" in name:
            assert "builtins.exec" in outcome[2], (name, outcome[2])
    for name in ("clean-weights", "clean-resume"):
        status, *rest = results[name]
        assert status == "loaded", (name, rest)
        assert len(rest[0]) == len(saved_params)
        assert all(torch.equal(a, b) for a, b in zip(rest[0], saved_params)), name


def test_export_tool_refuses_a_crafted_checkpoint(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    index = _copy(tiny_ckpt, tmp_path / "index")
    poison_index(index, tmp_path / "ran-index")
    r = run_tool("convert_megatron_to_hf.py", "--megatron-dir", index, "--out", tmp_path / "out-index")
    assert r.returncode == 2, r.stdout + r.stderr
    assert f"error: {index / '.metadata'}: refusing to load global builtins.exec" in r.stderr, r.stderr
    assert not (tmp_path / "ran-index").exists() and not (tmp_path / "out-index").exists()

    # Tensor data is the other pickled content the export reads (it reads no bytes items).
    tensor = _copy(tiny_ckpt, tmp_path / "tensor")
    file = poison_item(tensor, tensor_keys(tensor)[0], tmp_path / "ran-tensor")
    r = run_tool("convert_megatron_to_hf.py", "--megatron-dir", tensor, "--out", tmp_path / "out-tensor")
    assert r.returncode != 0
    assert f"UnsafeCheckpointError: {file} at bytes " in r.stderr and "refusing a tensor item" in r.stderr, r.stderr
    assert not (tmp_path / "ran-tensor").exists() and not (tmp_path / "out-tensor").exists()
