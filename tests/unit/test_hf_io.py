"""HFReader / HFShardedWriter on real safetensors files: single file, sharded with an index,
header-only dtype, named errors, and bit-exact write → read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from megatron_spin.convert.hf_io import (
    INDEX_NAME,
    SINGLE_NAME,
    HFCheckpointError,
    HFReader,
    HFShardedWriter,
    copy_side_files,
)


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


def make_tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=gen),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 8, generator=gen).to(torch.bfloat16),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=gen).half(),
        "model.norm.weight": torch.randn(8, generator=gen),
        "lm_head.weight": torch.randn(16, 8, generator=gen),
    }


@pytest.fixture
def single_dir(tmp_path):
    tensors = make_tensors()
    save_file(tensors, tmp_path / SINGLE_NAME, metadata={"format": "pt"})
    return tmp_path, tensors


@pytest.fixture
def sharded_dir(tmp_path):
    tensors = make_tensors(1)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:3], "model-00002-of-00002.safetensors": names[3:]}
    weight_map = {}
    for fname, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, tmp_path / fname, metadata={"format": "pt"})
        weight_map.update({k: fname for k in keys})
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return tmp_path, tensors, shards


# ---------------------------------------------------------------------------------------------
# reader


def test_reader_single_file(single_dir):
    d, tensors = single_dir
    r = HFReader(d)
    assert sorted(r.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert name in r
        assert _bits_equal(r.get(name), t), name
    assert "nope" not in r
    assert r.file_paths() == [d / SINGLE_NAME]
    r.close()


def test_reader_sharded_with_index(sharded_dir):
    d, tensors, shards = sharded_dir
    r = HFReader(d)
    assert sorted(r.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert _bits_equal(r.get(name), t), name
    assert r.file_paths() == sorted(d / f for f in shards)


def test_index_wins_over_single_file(sharded_dir):
    d, tensors, _ = sharded_dir
    save_file({"only.in.single": torch.zeros(2)}, d / SINGLE_NAME)
    r = HFReader(d)
    assert "only.in.single" not in r
    assert sorted(r.names()) == sorted(tensors)


@pytest.mark.parametrize(
    "name,dtype",
    [
        ("model.embed_tokens.weight", torch.float32),
        ("model.layers.0.self_attn.q_proj.weight", torch.bfloat16),
        ("model.layers.0.mlp.up_proj.weight", torch.float16),
    ],
)
def test_dtype_from_header(sharded_dir, name, dtype):
    r = HFReader(sharded_dir[0])
    assert r.dtype(name) == dtype


def test_dtype_does_not_load_the_tensor(single_dir, monkeypatch):
    d, _ = single_dir
    r = HFReader(d)
    handle = r._handle("model.layers.0.self_attn.q_proj.weight")

    class NoLoad:
        def __init__(self, inner):
            self._inner = inner

        def get_tensor(self, name):
            raise AssertionError("dtype() loaded the tensor")

        def get_slice(self, name):
            return self._inner.get_slice(name)

    r._handles = {SINGLE_NAME: NoLoad(handle)}
    assert r.dtype("model.layers.0.self_attn.q_proj.weight") == torch.bfloat16
    assert r.dtype("lm_head.weight") == torch.float32


def test_missing_tensor_is_named(single_dir, sharded_dir):
    for d in (single_dir[0], sharded_dir[0]):
        r = HFReader(d)
        for call in (r.get, r.dtype):
            with pytest.raises(HFCheckpointError) as info:
                call("model.layers.9.mlp.down_proj.weight")
            assert "model.layers.9.mlp.down_proj.weight" in str(info.value)
            assert str(d) in str(info.value)


def test_missing_files_name_the_dir(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"")  # not read: safetensors only
    with pytest.raises(HFCheckpointError) as info:
        HFReader(tmp_path)
    assert str(tmp_path) in str(info.value)
    assert SINGLE_NAME in str(info.value)


def test_nonexistent_dir_is_named(tmp_path):
    with pytest.raises(HFCheckpointError) as info:
        HFReader(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(info.value)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"metadata": {}})])
def test_bad_index_is_named(tmp_path, text):
    (tmp_path / INDEX_NAME).write_text(text)
    with pytest.raises(HFCheckpointError) as info:
        HFReader(tmp_path)
    assert str(tmp_path / INDEX_NAME) in str(info.value)


# ---------------------------------------------------------------------------------------------
# writer


def _write(out, tensors, max_shard_bytes):
    w = HFShardedWriter(out, max_shard_bytes=max_shard_bytes)
    for name, t in tensors.items():
        w.add(name, t)
    w.close()


def test_writer_single_file_when_small(tmp_path):
    tensors = make_tensors(2)
    out = tmp_path / "out"
    _write(out, tensors, max_shard_bytes=10**9)
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_NAME]
    r = HFReader(out)
    assert sorted(r.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert _bits_equal(r.get(name), t), name


def test_writer_shards_and_index(tmp_path):
    tensors = make_tensors(3)
    sizes = {k: t.numel() * t.element_size() for k, t in tensors.items()}
    max_bytes = 600  # embed (512 B) and lm_head (512 B) cannot share a shard
    assert max(sizes.values()) <= max_bytes < sum(sizes.values())
    out = tmp_path / "out"
    _write(out, tensors, max_shard_bytes=max_bytes)

    files = sorted(p.name for p in out.iterdir())
    shard_files = [f for f in files if f.endswith(".safetensors")]
    assert INDEX_NAME in files and SINGLE_NAME not in files
    assert not [f for f in files if f.endswith(".tmp")]
    n = len(shard_files)
    assert n >= 3
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]

    index = json.loads((out / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert set(index["weight_map"].values()) == set(shard_files)

    # No shard exceeds the limit (every tensor here fits one on its own).
    per_shard: dict[str, int] = {}
    for name, fname in index["weight_map"].items():
        per_shard[fname] = per_shard.get(fname, 0) + sizes[name]
    assert max(per_shard.values()) <= max_bytes
    # Order preserved: shards hold consecutive runs of the insertion order.
    order = [index["weight_map"][k] for k in tensors]
    assert order == sorted(order)

    r = HFReader(out)
    assert sorted(r.names()) == sorted(tensors)
    for name, t in tensors.items():
        assert _bits_equal(r.get(name), t), name
        assert r.dtype(name) == t.dtype


def test_writer_oversized_tensor_gets_its_own_shard(tmp_path):
    tensors = {"a": torch.ones(4), "big": torch.arange(64, dtype=torch.float32), "b": torch.zeros(4)}
    out = tmp_path / "out"
    _write(out, tensors, max_shard_bytes=32)  # "big" is 256 B > limit
    index = json.loads((out / INDEX_NAME).read_text())["weight_map"]
    assert len(set(index.values())) == 3
    r = HFReader(out)
    for name, t in tensors.items():
        assert _bits_equal(r.get(name), t)


def test_writer_makes_noncontiguous_tensors_contiguous(tmp_path):
    base = torch.randn(6, 4)
    tensors = {"t": base.t(), "s": base[::2]}
    out = tmp_path / "out"
    _write(out, tensors, max_shard_bytes=10**6)
    r = HFReader(out)
    for name, t in tensors.items():
        assert torch.equal(r.get(name), t)


def test_copy_side_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    (src / "config.json").write_text('{"a": 1}')
    (src / "tokenizer.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"x")
    copied = copy_side_files(src, dst)
    assert sorted(copied) == ["config.json", "tokenizer.json"]
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "tokenizer.json"]
    assert (dst / "config.json").read_text() == '{"a": 1}'


def test_writer_rejects_a_name_added_twice(tmp_path):
    w = HFShardedWriter(tmp_path / "out")
    w.add("a", torch.zeros(2))
    with pytest.raises(HFCheckpointError, match="'a' added twice"):
        w.add("a", torch.ones(2))


def test_writer_removes_a_stale_export_in_a_reused_directory(tmp_path):
    out = tmp_path / "out"
    big = HFShardedWriter(out, max_shard_bytes=8)
    big.add("a", torch.zeros(4))
    big.add("b", torch.zeros(4))
    big.close()
    assert (out / INDEX_NAME).exists()
    small = HFShardedWriter(out)
    small.add("c", torch.ones(4))
    small.close()
    assert not (out / INDEX_NAME).exists() and not list(out.glob("model-*-of-*.safetensors"))
    reader = HFReader(out)
    assert reader.names() == ["c"] and torch.equal(reader.get("c"), torch.ones(4))


def test_reader_names_shards_missing_from_the_index(tmp_path):
    out = tmp_path / "out"
    w = HFShardedWriter(out, max_shard_bytes=8)
    w.add("a", torch.zeros(4))
    w.add("b", torch.zeros(4))
    w.close()
    (out / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(HFCheckpointError, match="model-00002-of-00002.safetensors"):
        HFReader(out)
