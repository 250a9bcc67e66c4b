"""Reading a checkpoint runs no code from it (``ckpt.safe_load``), on small DCP checkpoints
written here in one process: the index's allow-list, BUILD on a class, bytes and tensor items,
``torch.load`` of common state with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` set, and an untouched
checkpoint still loading bit-exactly.  The project's own load paths (model weights, resume, the
export tool) are covered on real Megatron checkpoints in ``tests/dist/test_checkpoint_safety.py``.
"""

from __future__ import annotations

import pickle
import re
import warnings

import pytest
import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata

from megatron_spin.ckpt.safe_load import (
    SafeFileSystemReader,
    UnsafeCheckpointError,
    load_checkpoint_object,
    raising_refusals,
    read_dcp_metadata,
)
from tests.crafted_checkpoint import RunsCode, poison_index, poison_item


def _state() -> dict:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(4, 3, generator=g).to(torch.bfloat16), "b": torch.randn(5, generator=g),
            # a tuple is stored whole, as one bytes item (DCP flattens dicts and lists into their entries)
            "obj": ({"lr": 1e-3, "betas": (0.9, 0.999), "step": torch.tensor(3.0)}, ["a", "b"])}


def _dcp(fn, *args, **kwargs):
    with warnings.catch_warnings():  # no_dist is deliberate: one process
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        return fn(*args, **kwargs, no_dist=True)


@pytest.fixture
def ckpt(tmp_path):
    out = tmp_path / "ckpt"
    _dcp(dcp.save, _state(), storage_writer=FileSystemWriter(out))
    return out


def _load(ckpt_dir) -> dict:
    target = {"w": torch.zeros(4, 3, dtype=torch.bfloat16), "b": torch.zeros(5), "obj": None}
    with raising_refusals():
        _dcp(dcp.load, target, storage_reader=SafeFileSystemReader(ckpt_dir))
    return target


def test_untouched_checkpoint_reads_bit_exactly(ckpt):
    assert read_dcp_metadata(ckpt) == pickle.loads((ckpt / ".metadata").read_bytes())
    got, want = _load(ckpt), _state()
    assert torch.equal(got["w"].view(torch.int16), want["w"].view(torch.int16))
    assert torch.equal(got["b"], want["b"])
    groups, names = got["obj"]
    assert groups["betas"] == (0.9, 0.999) and groups["lr"] == 1e-3 and torch.equal(groups["step"], torch.tensor(3.0))
    assert names == ["a", "b"]


def test_index_that_runs_code_is_refused_naming_file_and_global(ckpt, tmp_path):
    marker = tmp_path / "ran"
    poison_index(ckpt, marker)
    with pytest.raises(UnsafeCheckpointError, match=rf"{ckpt / '.metadata'}: refusing to load global builtins\.exec"):
        read_dcp_metadata(ckpt)
    with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
        SafeFileSystemReader(ckpt).read_metadata()
    assert not marker.exists()


def test_build_on_a_class_is_refused(tmp_path):
    # GLOBAL Metadata; BUILD with slot state {"evil": 1}: a plain unpickler runs setattr(Metadata, "evil", 1).
    (tmp_path / ".metadata").write_bytes(b"ctorch.distributed.checkpoint.metadata\nMetadata\n(N}S'evil'\nI1\nstb.")
    with pytest.raises(UnsafeCheckpointError, match="refusing to set attributes on <class"):
        read_dcp_metadata(tmp_path)
    assert not hasattr(Metadata, "evil")


@pytest.mark.parametrize("content,reason", [
    (pickle.dumps({"state_dict_metadata": {}}), "holds a dict, not a checkpoint index"),
    (b"\x80\x04\x95", "not a readable checkpoint index"),
    (pickle.dumps(print), "refusing to load global builtins.print"),
])
def test_index_that_is_no_index_is_refused(tmp_path, content, reason):
    (tmp_path / ".metadata").write_bytes(content)
    with pytest.raises(UnsafeCheckpointError, match=reason):
        read_dcp_metadata(tmp_path)


@pytest.mark.parametrize("item,where", [
    ("obj", r" \(item obj\): refusing to load it: .*exec"),  # a bytes item (a ShardedObject)
    ("b", r" at bytes \d+\+\d+: refusing a tensor item: .*exec"),
])
def test_an_item_that_runs_code_is_refused(ckpt, tmp_path, item, where):
    marker = tmp_path / "ran"
    file = poison_item(ckpt, item, marker)
    with pytest.raises(UnsafeCheckpointError, match=re.escape(str(file)) + where):
        _load(ckpt)
    assert not marker.exists()


def test_pickled_file_is_weights_only_even_when_the_environment_says_otherwise(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # turns torch.load's *default* off
    marker = tmp_path / "ran"
    torch.save({"steps": 3, "x": RunsCode(marker)}, tmp_path / "common.pt")
    with pytest.raises(UnsafeCheckpointError, match=rf"{tmp_path / 'common.pt'}: refusing to load it: .*exec"):
        load_checkpoint_object(tmp_path / "common.pt")
    assert not marker.exists()
    torch.save({"steps": 3, "t": torch.ones(2)}, tmp_path / "plain.pt")
    assert load_checkpoint_object(tmp_path / "plain.pt")["steps"] == 3


def test_megatron_metadata_queries_read_through_the_allow_list(tmp_path):
    from megatron_spin.ckpt.dist_load import _SafeTorchDistLoad

    out = tmp_path / "ckpt"
    _dcp(dcp.save, {"w": torch.ones(2, 3), "obj/shard_0_1": ("x",)}, storage_writer=FileSystemWriter(out))
    meta = _SafeTorchDistLoad().load_sharded_metadata(out)
    assert tuple(meta["w"].global_shape) == (2, 3) and meta["obj/shard_0_1"].key == "obj"
    poison_index(out, tmp_path / "ran")
    for query in (_SafeTorchDistLoad().load_sharded_metadata, _SafeTorchDistLoad().load_tensors_metadata):
        with pytest.raises(UnsafeCheckpointError, match="builtins.exec"):
            query(out)
    assert not (tmp_path / "ran").exists()


def test_common_strategy_loads_weights_only(tmp_path):
    from megatron.core.dist_checkpointing.mapping import CheckpointingException, ShardedObject

    from megatron_spin.ckpt.dist_load import _SafeCommonLoad, _SafeTorchDistLoad

    with pytest.raises(CheckpointingException, match="common.pt: missing"):
        _SafeCommonLoad().load_common(tmp_path)
    with pytest.raises(CheckpointingException, match="sharded_backend 'zarr'"):
        _SafeTorchDistLoad().check_backend_compatibility("zarr")
    (tmp_path / "obj").mkdir()
    torch.save({"a": 1}, tmp_path / "obj" / "shard_0_1.pt")  # how the common strategy stores a ShardedObject
    objects = {"o": ShardedObject("obj", None, (1,), (0,), replica_id=0)}
    assert _SafeCommonLoad().load_sharded_objects(objects, tmp_path) == {"o": {"a": 1}}
    torch.save({"a": RunsCode(tmp_path / "ran")}, tmp_path / "obj" / "shard_0_1.pt")
    with pytest.raises(UnsafeCheckpointError, match="shard_0_1.pt: refusing to load it"):
        _SafeCommonLoad().load_sharded_objects({"o": ShardedObject("obj", None, (1,), (0,), replica_id=0)}, tmp_path)
    assert not (tmp_path / "ran").exists()
