"""The weight path's pure pieces: buckets and flat buckets, the tensor payload codec, the sync
config and receipt check, TP shard merging, and the embedded engine's checked weight store.

Everything runs in one process on the CPU; the HTTP transports are tested elsewhere.
"""

from __future__ import annotations

import dataclasses

import base64
import json
import math
import os
import pickle
import types

import pytest
import torch
from safetensors.torch import save_file

from megatron_spin.convert import converter_for
from megatron_spin.errors import ConfigError
from megatron_spin.rollout.embedded.weights import ModelWeights, load_safetensors_dir, read_safetensors_dir
from megatron_spin.spec.precision import DType
from megatron_spin.sync.config import PushTarget, SyncConfig, TransportKind
from megatron_spin.sync.push import SyncError, check_receipts
from megatron_spin.sync.transports import (
    DiskTransport,
    DistributedTransport,
    Receipt,
    make_transport,
)
from megatron_spin.wire.bucket import FlatEntry, bucketed, flatten, nbytes, unflatten
from megatron_spin.wire.tensor_payload import (
    FLATTENED_BUCKET,
    PayloadError,
    decode_named_tensors,
    encode,
    encode_named_tensors,
)
from tests.conftest import make_arch


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bytes of ``t`` (so NaN payloads and -0.0 compare exactly)."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def assert_bit_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert torch.equal(_bits(a), _bits(b))


def f32(numel: int) -> torch.Tensor:
    return torch.arange(numel, dtype=torch.float32)


# --------------------------------------------------------------------------- bucketed


def _names(buckets):
    return [[n for n, _ in b] for b in buckets]


def test_bucketed_greedy_groups():
    # float32 sizes in bytes: 40 40 40 120 20 20 400 4; buckets of 80 bytes.
    numels = [10, 10, 10, 30, 5, 5, 100, 1]
    stream = [(f"t{k}", f32(n)) for k, n in enumerate(numels)]
    buckets = list(bucketed(stream, 80))
    assert _names(buckets) == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"], ["t6"], ["t7"]]


@pytest.mark.parametrize("bucket_bytes", [1, 16, 80, 100, 333, 10_000])
def test_bucketed_properties(bucket_bytes):
    torch.manual_seed(0)
    numels = torch.randint(1, 60, (40,)).tolist()
    stream = [(f"t{k}", f32(n)) for k, n in enumerate(numels)]
    buckets = list(bucketed(iter(stream), bucket_bytes))
    flat = [item for b in buckets for item in b]
    assert [n for n, _ in flat] == [n for n, _ in stream]  # nothing lost, order kept
    assert all(t is s for (_, t), (_, s) in zip(flat, stream))  # no copies
    for k, b in enumerate(buckets):
        size = sum(nbytes(t) for _, t in b)
        assert b, "empty bucket"
        assert size <= bucket_bytes or len(b) == 1  # an oversize tensor travels alone
        if k + 1 < len(buckets):  # greedy: the next tensor did not fit
            assert size + nbytes(buckets[k + 1][0][1]) > bucket_bytes


@pytest.mark.parametrize("bucket_bytes", [0, -1])
def test_bucketed_nonpositive_means_one_per_bucket(bucket_bytes):
    stream = [(f"t{k}", f32(k + 1)) for k in range(5)]
    assert _names(bucketed(stream, bucket_bytes)) == [[f"t{k}"] for k in range(5)]


def test_bucketed_empty_stream_and_mixed_dtypes():
    assert list(bucketed([], 100)) == []
    stream = [("a", torch.zeros(4, dtype=torch.bfloat16)), ("b", torch.zeros(2, dtype=torch.float64)),
              ("c", torch.zeros(1, dtype=torch.float32))]
    # bytes: 8, 16, 4 -> with 24: [a, b] (24), [c]
    assert _names(bucketed(stream, 24)) == [["a", "b"], ["c"]]


def test_bucketed_is_lazy():
    pulled = []

    def stream():
        for k in range(6):
            pulled.append(k)
            yield f"t{k}", f32(10)  # 40 bytes each

    it = bucketed(stream(), 80)
    first = next(it)
    assert _names([first]) == [["t0", "t1"]]
    assert pulled == [0, 1, 2]  # holds one bucket plus the tensor that did not fit, no more


# --------------------------------------------------------------------------- flatten / unflatten


def _mixed() -> list[tuple[str, torch.Tensor]]:
    torch.manual_seed(1)
    weird = torch.tensor([float("nan"), -0.0, float("inf"), 1e-40], dtype=torch.float32)
    return [
        ("f32", torch.randn(3, 4)),  # 48 bytes at 0
        ("i64", torch.tensor([-5, 0, 2**40, 7, -1], dtype=torch.int64)),  # 40 at 48
        ("scalar", torch.tensor(3.5)),  # 0-d, 4 at 88
        ("weird", weird),  # 16 at 92
        ("bf16", torch.randn(2, 3).to(torch.bfloat16)),  # 12 at 108
        ("f16", torch.randn(4).to(torch.float16)),  # 8 at 120
        ("empty", torch.empty(0, 3, dtype=torch.bfloat16)),  # 0 at 128
        ("transposed", torch.randn(2, 6).t()),  # non-contiguous, 48 at 128
        ("f16_scalar", torch.tensor(-2.0, dtype=torch.float16)),  # 2 at 176
    ]


def test_flatten_unflatten_round_trip_bit_exact():
    named = _mixed()
    flat, entries = flatten(named)
    assert flat.dtype == torch.uint8 and flat.dim() == 1
    assert flat.numel() == sum(nbytes(t) for _, t in named)
    assert [e.name for e in entries] == [n for n, _ in named]
    assert entries[0].start_idx == 0 and entries[-1].end_idx == flat.numel()
    assert all(a.end_idx == b.start_idx for a, b in zip(entries, entries[1:]))
    out = unflatten(flat, entries)
    assert [n for n, _ in out] == [n for n, _ in named]
    for (_, got), (_, want) in zip(out, named):
        assert_bit_equal(got, want)
    assert out[2][1].dim() == 0 and out[6][1].shape == (0, 3)


def test_unflatten_returns_views_into_the_buffer():
    flat, entries = flatten([("a", f32(4)), ("b", f32(2))])
    out = dict(unflatten(flat, entries))
    flat.zero_()
    assert torch.equal(out["a"], torch.zeros(4)) and torch.equal(out["b"], torch.zeros(2))


def test_flatten_copies_the_sources():
    src = f32(4)
    flat, entries = flatten([("a", src)])
    src.fill_(9.0)
    assert torch.equal(dict(unflatten(flat, entries))["a"], f32(4))


def test_flatten_shared():
    named = [("a", f32(8))]
    flat, _ = flatten(named, shared=True)
    assert flat.is_shared()
    flat, _ = flatten(named, shared=False)
    assert not flat.is_shared()


def test_flatten_empty_bucket():
    flat, entries = flatten([])
    assert flat.numel() == 0 and entries == []
    assert unflatten(flat, entries) == []


def test_flatten_round_trip_misaligned_order():
    named = [("h", torch.randn(3).to(torch.bfloat16)), ("f", torch.randn(2)), ("l", torch.arange(3))]
    flat, entries = flatten(named)
    for (_, got), (_, want) in zip(unflatten(flat, entries), named):
        assert_bit_equal(got, want)


def test_flat_entry_wire_round_trip():
    _, entries = flatten(_mixed())
    for e in entries:
        wire = e.to_wire()
        assert isinstance(wire, types.SimpleNamespace)
        assert isinstance(wire.shape, torch.Size) and wire.dtype == e.dtype
        assert (wire.start_idx, wire.end_idx, wire.numel) == (e.start_idx, e.end_idx, e.numel)
        assert FlatEntry.from_wire(wire) == e


def test_flat_entry_from_wire_missing_field():
    wire = FlatEntry("a", (2,), torch.float32, 0, 8, 2).to_wire()
    del wire.numel
    with pytest.raises(ValueError, match="lacks a field"):
        FlatEntry.from_wire(wire)


@pytest.mark.parametrize(
    "entry, match",
    [
        (FlatEntry("past_end", (4,), torch.float32, 0, 16, 4), "past_end"),  # 16 bytes in an 8-byte bucket
        (FlatEntry("start_past_end", (1,), torch.float32, 8, 12, 1), "start_past_end"),
        (FlatEntry("negative", (1,), torch.float32, -4, 0, 1), "negative"),
        (FlatEntry("bytes", (2,), torch.float32, 0, 4, 2), "bytes"),  # 2 floats need 8 bytes
        (FlatEntry("misaligned", (1,), torch.float32, 2, 6, 1), "misaligned"),
        (FlatEntry("not_dtype", (2,), "float32", 0, 8, 2), "not a torch dtype"),
    ],
)
def test_unflatten_rejects_inconsistent_entries(entry, match):
    flat = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError, match=match):
        unflatten(flat, [entry])


def test_numel_is_bytes_as_sglang_writes_it_and_is_not_read():
    """SGLang's producers (and slime's, verl's) write the byte count into ``numel``; no reader uses
    it.  Ours write bytes too, and a bucket from either convention decodes."""
    named = [("a", torch.arange(3, dtype=torch.float32)), ("b", torch.ones(2, dtype=torch.bfloat16))]
    flat, entries = flatten(named)
    assert [e.numel for e in entries] == [12, 4]
    as_elements = [dataclasses.replace(e, numel=t.numel()) for e, (_, t) in zip(entries, named)]
    for table in (entries, as_elements):
        assert all(torch.equal(a, b) for (_, a), (_, b) in zip(unflatten(flat, table), named))


def test_unflatten_rejects_bad_buffer():
    with pytest.raises(ValueError, match="1-D uint8"):
        unflatten(torch.zeros(8), [])
    with pytest.raises(ValueError, match="1-D uint8"):
        unflatten(torch.zeros(2, 4, dtype=torch.uint8), [])


# --------------------------------------------------------------------------- tensor payload


def test_payload_round_trip_plain_list():
    named = _mixed()
    got = decode_named_tensors(encode_named_tensors(named, None), None)
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, a), (_, b) in zip(got, named):
        assert_bit_equal(a, b)


def test_payload_round_trip_flattened_bucket():
    named = _mixed()
    flat = flatten(named, shared=True)
    data = encode_named_tensors(named, FLATTENED_BUCKET, flat=flat)
    assert isinstance(data, str)
    got = decode_named_tensors(data, FLATTENED_BUCKET)
    assert [n for n, _ in got] == [n for n, _ in named]
    for (_, a), (_, b) in zip(got, named):
        assert_bit_equal(a, b)


def test_encode_rejects_unknown_load_format():
    with pytest.raises(ValueError, match="load_format"):
        encode_named_tensors([("a", f32(2))], "direct")


@pytest.mark.parametrize("data", [b"abc", None, 3, ["x"]])
def test_decode_rejects_non_str(data):
    with pytest.raises(PayloadError, match="base64 strings"):
        decode_named_tensors(data, None)


@pytest.mark.parametrize("data", ["!!!not base64!!!", "abc", base64.b64encode(b"not a pickle").decode(), ""])
def test_decode_rejects_undecodable(data):
    with pytest.raises(PayloadError, match="cannot decode"):
        decode_named_tensors(data, None)


class _TouchOnLoad:
    """Unpickling this would run ``os.system("touch PATH")``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return os.system, (f"touch {self.path}",)


class _OpenOnLoad:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")


@pytest.mark.parametrize("evil", [_TouchOnLoad, _OpenOnLoad])
@pytest.mark.parametrize("load_format", [None, FLATTENED_BUCKET])
def test_decode_refuses_forbidden_globals_and_runs_nothing(tmp_path, evil, load_format):
    marker = tmp_path / "pwned"
    raw = pickle.dumps([("w", torch.zeros(2)), ("x", evil(marker))])
    # Check the attack is real: a plain unpickler does run it.
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(evil(probe)))
    assert probe.exists()
    with pytest.raises(PayloadError, match="refusing to load"):
        decode_named_tensors(base64.b64encode(raw).decode(), load_format)
    assert not marker.exists()


@pytest.mark.parametrize("target", [torch.load, torch.save, eval, getattr])
def test_decode_refuses_non_tensor_callables(target):
    class Evil:
        def __reduce__(self):
            return target, ("x",)

    with pytest.raises(PayloadError, match="refusing"):
        decode_named_tensors(base64.b64encode(pickle.dumps(Evil())).decode(), None)


def test_decode_wrong_structure():
    tensors = [("a", f32(3))]
    as_dict = encode({"a": f32(3)})
    with pytest.raises(PayloadError, match=r"list of \(name, tensor\) pairs"):
        decode_named_tensors(as_dict, None)
    with pytest.raises(PayloadError, match=r"list of \(name, tensor\) pairs"):
        decode_named_tensors(encode([("a", f32(3), "extra")]), None)
    with pytest.raises(PayloadError, match=r"list of \(name, tensor\) pairs"):
        decode_named_tensors(encode([(1, f32(3))]), None)
    with pytest.raises(PayloadError, match="flattened_bucket payload"):
        decode_named_tensors(encode_named_tensors(tensors, None), FLATTENED_BUCKET)
    with pytest.raises(PayloadError, match="flattened_bucket payload"):
        decode_named_tensors(encode({"flattened_tensor": "x", "metadata": []}), FLATTENED_BUCKET)


def test_decode_flattened_bad_metadata():
    buf = torch.zeros(8, dtype=torch.uint8)
    bad = FlatEntry("w", (4,), torch.float32, 0, 16, 4).to_wire()  # past the end
    with pytest.raises(PayloadError, match="flattened_bucket metadata: w"):
        decode_named_tensors(encode({"flattened_tensor": buf, "metadata": [bad]}), FLATTENED_BUCKET)
    lacking = types.SimpleNamespace(name="w", shape=torch.Size([2]))
    with pytest.raises(PayloadError, match="lacks a field"):
        decode_named_tensors(encode({"flattened_tensor": buf, "metadata": [lacking]}), FLATTENED_BUCKET)


@pytest.mark.parametrize("load_format", ["direct", "", "FLATTENED_BUCKET"])
def test_decode_unknown_load_format(load_format):
    data = encode_named_tensors([("a", f32(2))], None)
    with pytest.raises(PayloadError, match="load_format"):
        decode_named_tensors(data, load_format)


# --------------------------------------------------------------------------- SyncConfig, receipts


# Keys are relative to the record; the loader reports them under actor_rollout_ref.rollout.sync.
@pytest.mark.parametrize(
    "kwargs, key, rule",
    [
        (dict(transport="nccl"), "transport", "one of tensor, disk, distributed, shared; got 'nccl'"),
        (dict(transport="Tensor"), "transport", "one of tensor, disk, distributed, shared; got 'Tensor'"),
        (dict(bucket_mb=-1), "bucket_mb", "must be >= 0, got -1"),
        (dict(bucket_mb=-0.5), "bucket_mb", "must be >= 0, got -0.5"),
        (dict(bucket_mb=math.nan), "bucket_mb", "must be >= 0, got nan"),
        (dict(bucket_mb=math.inf), "bucket_mb", "must be >= 0, got inf"),
        (dict(dtype="fp8"), "dtype", "one of float32, bfloat16, float16, null; got 'fp8'"),
        (dict(dtype="torch.bfloat16"), "dtype", "one of float32, bfloat16, float16, null; got 'torch.bfloat16'"),
        (dict(dtype="bf16"), "dtype", "one of float32, bfloat16, float16, null; got 'bf16'"),
        (dict(load_format="flatened_bucket"), "load_format", "one of null, flattened_bucket; got 'flatened_bucket'"),
        (dict(load_format="direct"), "load_format", "one of null, flattened_bucket; got 'direct'"),
        (dict(group_timeout_s=0), "group_timeout_s", "must be > 0, got 0"),
        (dict(group_timeout_s=-1.0), "group_timeout_s", "must be > 0, got -1.0"),
        (dict(verify_every=-1), "verify_every", "must be >= 0, got -1"),
        (dict(verify_tolerance=0.0), "verify_tolerance", "must be > 0, got 0.0"),
        (dict(verify_tolerance=-0.1), "verify_tolerance", "must be > 0, got -0.1"),
        (dict(verify_tolerance=math.nan), "verify_tolerance", "must be > 0, got nan"),
        (dict(verify_tolerance=math.inf), "verify_tolerance", "must be > 0, got inf"),
    ],
)
def test_sync_config_rejects(kwargs, key, rule):
    with pytest.raises(ConfigError) as info:
        SyncConfig(**kwargs)
    assert info.value.key == key
    assert str(info.value) == f"{key}: {rule}"


def test_sync_config_accepts():
    cfg = SyncConfig()
    assert (cfg.transport, cfg.dtype, cfg.load_format) == (TransportKind.TENSOR, None, FLATTENED_BUCKET)
    assert cfg.bucket_bytes == int(cfg.bucket_mb * 1e6)
    cfg = SyncConfig(transport="disk", bucket_mb=0, dtype="bfloat16")
    assert (cfg.transport, cfg.dtype, cfg.bucket_bytes) == (TransportKind.DISK, DType.BFLOAT16, 0)
    cfg = SyncConfig(transport="distributed", dtype="float32", load_format=None, group_timeout_s=0.5,
                     verify_every=3, verify_tolerance=1e-3, bucket_mb=1.5)
    assert (cfg.transport, cfg.dtype, cfg.load_format) == (TransportKind.DISTRIBUTED, DType.FLOAT32, None)
    assert (cfg.bucket_bytes, cfg.verify_every, cfg.verify_tolerance) == (1_500_000, 3, 1e-3)


def test_make_transport_builds_the_configured_transport(tmp_path):
    tensor = make_transport(SyncConfig(load_format=None), PushTarget(engine_tp_size=4))
    with pytest.raises(RuntimeError, match="only commits"):  # tensors travel by the feed route, not a pusher
        tensor.send([("x", torch.zeros(1))])
    disk = make_transport(SyncConfig(transport="disk"), PushTarget(disk_dir=str(tmp_path), side_files=str(tmp_path)))
    assert isinstance(disk, DiskTransport) and disk.root == tmp_path and disk.side_files == tmp_path
    dist = make_transport(SyncConfig(transport="distributed", group_timeout_s=7.0), PushTarget(engine_tp_size=2),
                          address="10.0.0.7")
    assert isinstance(dist, DistributedTransport)
    assert (dist.master_address, dist.engine_tp_size, dist.timeout_s) == ("10.0.0.7", 2, 7.0)


@pytest.mark.parametrize("target", [PushTarget(), PushTarget(disk_dir=""), PushTarget(disk_dir=None, engine_tp_size=2)])
def test_make_transport_refuses_disk_without_a_directory(target):
    with pytest.raises(ValueError, match=r"the disk transport needs a directory every engine can read "
                                         r"\(PushTarget\.disk_dir\)"):
        make_transport(SyncConfig(transport="disk"), target)


URL = "http://engine-a"


def _receipts(names_per_stage, engines=(URL,)):
    return [Receipt(stage=s, engines=list(engines), names=list(names)) for s, names in enumerate(names_per_stage)]


def check(arch, receipts, urls=(URL,)):
    check_receipts(arch, receipts, urls)


def test_check_receipts_complete_passes():
    arch = make_arch()
    names = converter_for(arch).hf_names(arch)
    assert len(names) == len(set(names)) > 0
    half = len(names) // 2
    check(arch, _receipts([names[:half], names[half:]]))  # two stages
    check(arch, _receipts([list(reversed(names))]))  # order does not matter


def test_check_receipts_missing_tensor():
    arch = make_arch()
    names = converter_for(arch).hf_names(arch)
    gone = "model.layers.5.mlp.up_proj.weight"
    assert gone in names
    with pytest.raises(SyncError, match=rf"1 tensors missing.*{gone}.*not advanced"):
        check(arch, _receipts([[n for n in names if n != gone]]))
    with pytest.raises(SyncError, match="tensors missing"):
        check(arch, [])


def test_check_receipts_duplicate_and_unexpected():
    arch = make_arch()
    names = converter_for(arch).hf_names(arch)
    dup = "model.layers.0.self_attn.q_proj.weight"
    with pytest.raises(SyncError, match=rf"0 tensors missing.*1 unexpected or repeated.*{dup}"):
        check(arch, _receipts([names, [dup]]))  # two stages both sent it
    with pytest.raises(SyncError, match="model.layers.99.mlp.gate_proj.weight"):
        check(arch, _receipts([names + ["model.layers.99.mlp.gate_proj.weight"]]))


def test_check_receipts_per_engine():
    """Each engine must get every tensor: the feed route sends each its own full copy."""
    arch = make_arch()
    names = converter_for(arch).hf_names(arch)
    b = "http://engine-b"
    check(arch, _receipts([names], engines=(URL,)) + _receipts([names], engines=(b,)), urls=(URL, b))
    with pytest.raises(SyncError, match=r"partial push to http://engine-b: \d+ tensors missing"):
        check(arch, _receipts([names], engines=(URL,)) + _receipts([names[1:]], engines=(b,)), urls=(URL, b))
    failed = _receipts([names[:3]], engines=(b,))
    failed[0].failed[b] = "HTTP 400: refused"
    check(arch, _receipts([names], engines=(URL,)) + failed, urls=(URL, b))  # a failed engine is dropped, not checked


def test_check_receipts_tied_model_has_no_lm_head():
    arch = make_arch(tie_word_embeddings=True)
    names = converter_for(arch).hf_names(arch)
    assert "lm_head.weight" not in names
    check(arch, _receipts([names]))
    with pytest.raises(SyncError, match="lm_head.weight"):
        check(arch, _receipts([names + ["lm_head.weight"]]))


# --------------------------------------------------------------------------- merge_tp_shards


@pytest.fixture
def table_and_arch():
    arch = make_arch()
    return converter_for(arch), arch


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_merge_fused_gate_up(table_and_arch, tp):
    table, arch = table_and_arch
    ffn, hidden = arch.ffn_hidden_size, arch.hidden_size
    gate = torch.arange(ffn * hidden, dtype=torch.float32).reshape(ffn, hidden)
    up = -1 - torch.arange(ffn * hidden, dtype=torch.float32).reshape(ffn, hidden)
    param = table.param("decoder.layers.0.mlp.linear_fc1.weight")
    full = table.to_megatron(arch, param, {"model.layers.0.mlp.gate_proj.weight": gate,
                                           "model.layers.0.mlp.up_proj.weight": up}.__getitem__)
    assert torch.equal(full, torch.cat([gate, up]))
    # Megatron's split: rank r holds [gate_r; up_r] (each part split on its own).
    shards = [torch.cat([g, u]) for g, u in zip(torch.chunk(gate, tp), torch.chunk(up, tp))]
    merged = table.merge_tp_shards(param, shards)
    assert torch.equal(merged, full)
    if tp > 1:
        assert not torch.equal(torch.cat(shards), full)  # a plain concatenation would be wrong
    hf = table.to_hf(arch, param, merged)
    assert torch.equal(hf["model.layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(hf["model.layers.0.mlp.up_proj.weight"], up)


@pytest.mark.parametrize("tp", [2, 4])
def test_merge_column_qkv_is_plain_cat(table_and_arch, tp):
    table, arch = table_and_arch
    param = table.param("decoder.layers.3.self_attention.linear_qkv.weight")
    rows = arch.num_kv_heads * (arch.heads_per_group + 2) * arch.head_dim
    full = torch.randn(rows, arch.hidden_size)
    shards = list(torch.chunk(full, tp, dim=0))
    assert torch.equal(table.merge_tp_shards(param, shards), full)


@pytest.mark.parametrize("tp", [2, 4])
def test_merge_row_linear_proj_along_dim1(table_and_arch, tp):
    table, arch = table_and_arch
    for name in ("decoder.layers.1.self_attention.linear_proj.weight", "decoder.layers.1.mlp.linear_fc2.weight"):
        param = table.param(name)
        assert param.rule.tp_dim == 1
        full = torch.randn(arch.hidden_size, 32)
        shards = list(torch.chunk(full, tp, dim=1))
        merged = table.merge_tp_shards(param, shards)
        assert merged.shape == full.shape and torch.equal(merged, full)


def test_merge_vocab_parallel_embedding(table_and_arch):
    table, arch = table_and_arch
    full = torch.randn(arch.vocab_size, arch.hidden_size)
    for name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        param = table.param(name)
        assert torch.equal(table.merge_tp_shards(param, list(torch.chunk(full, 4))), full)


def test_merge_replicated_returns_shard_zero(table_and_arch):
    table, arch = table_and_arch
    for name in ("decoder.layers.2.input_layernorm.weight", "decoder.layers.2.pre_mlp_layernorm.weight",
                 "decoder.final_layernorm.weight"):
        param = table.param(name)
        assert param.rule.tp_dim is None
        shards = [torch.full((arch.hidden_size,), float(r)) for r in range(4)]
        assert table.merge_tp_shards(param, shards) is shards[0]


def test_merge_single_shard_is_identity(table_and_arch):
    table, _ = table_and_arch
    t = torch.randn(5, 3)
    assert table.merge_tp_shards(table.param("decoder.layers.0.mlp.linear_fc1.weight"), [t]) is t


# --------------------------------------------------------------------------- ModelWeights


def _model() -> torch.nn.Module:
    torch.manual_seed(3)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _assert_unchanged(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), before[n]), f"{n} changed"


def _full(value: float = 1.0) -> dict[str, torch.Tensor]:
    return {"0.weight": torch.full((4, 3), value), "0.bias": torch.full((4,), value),
            "1.weight": torch.full((2, 4), value), "1.bias": torch.full((2,), value)}


def test_model_weights_metadata():
    w = ModelWeights(_model())
    assert w.names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert w.shape("0.weight") == (4, 3) and w.dtype("1.bias") == torch.float32
    assert w.unloaded == set() and not w.released
    with pytest.raises(KeyError):
        w.get("2.weight")


def test_model_weights_tied_parameter_appears_once():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Embedding(5, 3)
            self.head = torch.nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight  # tied, as in tie_word_embeddings

    m = Tied()
    w = ModelWeights(m)
    assert w.names == ["embed.weight"]
    w.load([("embed.weight", torch.ones(5, 3))])
    assert torch.equal(m.head.weight.detach(), torch.ones(5, 3))  # one copy reaches both


def test_check_lists_every_problem_in_one_error():
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    bad = [
        ("nope.weight", torch.zeros(1)),
        ("0.weight", torch.zeros(3, 4)),  # transposed shape
        ("0.bias", torch.zeros(4, dtype=torch.int64)),
        ("1.weight", torch.tensor([[0.0, float("nan"), 0.0, 0.0]] * 2)),
        ("1.bias", torch.zeros(2)),
        ("1.bias", torch.zeros(2)),
    ]
    with pytest.raises(PayloadError) as info:
        w.check(bad, complete=True, where="update v3")
    msg = str(info.value)
    assert msg.startswith("update v3 rejected, weights unchanged")
    for needle in ("unknown tensor 'nope.weight'", "0.weight: shape (3, 4), the model has (4, 3)",
                   "0.bias: dtype torch.int64 is not floating point", "1.weight: holds NaN or Inf",
                   "1.bias: sent twice"):
        assert needle in msg, needle
    assert "missing" not in msg  # every name was sent (some badly)
    _assert_unchanged(m, before)


def test_check_inf_and_overflowing_problem_list():
    w = ModelWeights(_model())
    bad = [(f"x{k}", torch.zeros(1)) for k in range(7)] + [("0.bias", torch.full((4,), float("inf")))]
    with pytest.raises(PayloadError, match=r"\(and 3 more\)"):
        w.check(bad)
    with pytest.raises(PayloadError, match="0.bias: holds NaN or Inf"):
        w.check([("0.bias", torch.full((4,), float("-inf")))])


def test_check_complete_requires_every_name():
    w = ModelWeights(_model())
    full = _full()
    part = [(n, t) for n, t in full.items() if n != "1.weight"]
    w.check(part)  # fine as a partial update
    with pytest.raises(PayloadError, match=r"1 of the model's tensors missing, e.g. \['1.weight'\]"):
        w.check(part, complete=True)
    w.check(list(full.items()), complete=True)


def test_check_accepts_other_float_dtypes_and_meta():
    w = ModelWeights(_model())
    w.check([("0.weight", torch.zeros(4, 3, dtype=torch.bfloat16))])
    w.check([("0.weight", torch.empty(4, 3, device="meta"))])
    with pytest.raises(PayloadError, match="shape"):
        w.check([("0.weight", torch.empty(4, 4, device="meta"))])


def test_load_copies_and_counts_bytes():
    m = _model()
    w = ModelWeights(m)
    src = torch.full((4, 3), 2.5)
    assert w.load([("0.weight", src), ("1.bias", torch.ones(2))]) == 48 + 8
    assert torch.equal(m[0].weight.detach(), torch.full((4, 3), 2.5))
    src.fill_(0.0)
    assert torch.equal(m[0].weight.detach(), torch.full((4, 3), 2.5))  # a copy, not an alias
    assert w.get("0.weight") is m[0].weight


def test_release_resume_and_reload():
    m = _model()
    w = ModelWeights(m)
    w.release()
    assert w.released
    assert all(p.numel() == 0 for p in m.parameters())
    assert w.unloaded == set(w.names)
    w.resume()
    assert not w.released
    assert [tuple(p.shape) for p in m.parameters()] == [(4, 3), (4,), (2, 4), (2,)]
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert w.unloaded == set(w.names)  # reallocated, but nothing loaded yet
    full = _full(0.5)
    w.load([(n, full[n]) for n in ("0.weight", "1.bias")])
    assert w.unloaded == {"0.bias", "1.weight"}
    w.load([(n, full[n]) for n in ("0.bias", "1.weight")])
    assert w.unloaded == set()
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), full[n])
    out = m(torch.ones(1, 3))  # the model still works
    assert out.shape == (1, 2)


def test_resume_without_release_is_a_no_op():
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    w.resume()
    _assert_unchanged(m, before)
    assert w.unloaded == set()


# --------------------------------------------------------------------------- load_safetensors_dir


def _write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def test_load_dir_complete(tmp_path):
    m = _model()
    w = ModelWeights(m)
    full = {n: torch.randn(t.shape) for n, t in _full().items()}
    _write(tmp_path / "model-00001-of-00002.safetensors", {k: full[k] for k in ("0.weight", "0.bias")})
    _write(tmp_path / "model-00002-of-00002.safetensors", {k: full[k] for k in ("1.weight", "1.bias")})
    (tmp_path / "config.json").write_text("{}")
    assert load_safetensors_dir(w, tmp_path) == (12 + 4 + 8 + 2) * 4
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), full[n])
    assert sorted(n for n, _ in read_safetensors_dir(tmp_path)) == sorted(full)


def test_load_dir_after_release_resume_clears_unloaded(tmp_path):
    m = _model()
    w = ModelWeights(m)
    _write(tmp_path / "model.safetensors", _full(0.25))
    w.release()
    w.resume()
    load_safetensors_dir(w, tmp_path)
    assert w.unloaded == set() and not w.released
    assert torch.equal(m[1].bias.detach(), torch.full((2,), 0.25))


def test_load_dir_missing_tensor_rejected(tmp_path):
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    full = _full(7.0)
    del full["1.bias"]
    _write(tmp_path / "model.safetensors", full)
    with pytest.raises(PayloadError, match=r"missing, e.g. \['1.bias'\]"):
        load_safetensors_dir(w, tmp_path)
    _assert_unchanged(m, before)


@pytest.mark.parametrize(
    "name, tensor, match",
    [
        ("1.weight", torch.zeros(4, 2), "1.weight: shape"),
        ("1.weight", torch.zeros(2, 4, dtype=torch.int32), "not floating point"),
        ("extra.weight", torch.zeros(1), "unknown tensor 'extra.weight'"),
    ],
)
def test_load_dir_bad_second_file_rejected_before_any_copy(tmp_path, name, tensor, match):
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    full = _full(7.0)
    _write(tmp_path / "a.safetensors", {k: full[k] for k in ("0.weight", "0.bias")})
    second = {k: full[k] for k in ("1.weight", "1.bias")}
    second[name] = tensor
    _write(tmp_path / "b.safetensors", second)
    with pytest.raises(PayloadError, match=match):
        load_safetensors_dir(w, tmp_path)
    _assert_unchanged(m, before)


def test_load_dir_nan_rejected_single_file(tmp_path):
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    full = _full(7.0)
    full["0.bias"][2] = float("nan")
    _write(tmp_path / "model.safetensors", full)
    with pytest.raises(PayloadError, match="0.bias: holds NaN"):
        load_safetensors_dir(w, tmp_path)
    _assert_unchanged(m, before)


def test_load_dir_nan_in_second_file_leaves_weights_unchanged(tmp_path):
    m = _model()
    w = ModelWeights(m)
    before = _snapshot(m)
    full = _full(7.0)
    full["1.weight"][0, 0] = float("nan")
    _write(tmp_path / "a.safetensors", {k: full[k] for k in ("0.weight", "0.bias")})
    _write(tmp_path / "b.safetensors", {k: full[k] for k in ("1.weight", "1.bias")})
    with pytest.raises(PayloadError, match="holds NaN"):
        load_safetensors_dir(w, tmp_path)
    _assert_unchanged(m, before)


def test_load_dir_with_index(tmp_path):
    m = _model()
    w = ModelWeights(m)
    full = _full(3.0)
    _write(tmp_path / "part-a.safetensors", {k: full[k] for k in ("0.weight", "1.bias")})
    _write(tmp_path / "part-b.safetensors", {k: full[k] for k in ("0.bias", "1.weight")})
    # A stray file the index does not name: it must not be read (it would be rejected).
    _write(tmp_path / "stray.safetensors", {"junk": torch.zeros(1)})
    index = {"metadata": {"total_size": 104}, "weight_map": {
        "0.weight": "part-a.safetensors", "1.bias": "part-a.safetensors",
        "0.bias": "part-b.safetensors", "1.weight": "part-b.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert load_safetensors_dir(w, tmp_path) == 104
    for n, p in m.named_parameters():
        assert torch.equal(p.detach(), full[n])


def test_load_dir_index_naming_a_missing_file(tmp_path):
    w = ModelWeights(_model())
    _write(tmp_path / "part-a.safetensors", _full())
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"0.weight": "part-a.safetensors", "0.bias": "gone.safetensors"}}))
    with pytest.raises(PayloadError, match="gone.safetensors"):
        load_safetensors_dir(w, tmp_path)


@pytest.mark.parametrize("text", ["{not json", json.dumps({"metadata": {}})])
def test_load_dir_unreadable_index(tmp_path, text):
    w = ModelWeights(_model())
    _write(tmp_path / "model.safetensors", _full())
    (tmp_path / "model.safetensors.index.json").write_text(text)
    with pytest.raises(PayloadError, match="unreadable index"):
        load_safetensors_dir(w, tmp_path)


def test_load_dir_not_a_directory_or_empty(tmp_path):
    w = ModelWeights(_model())
    with pytest.raises(PayloadError, match="not a directory"):
        load_safetensors_dir(w, tmp_path / "absent")
    with pytest.raises(PayloadError, match="no .safetensors files"):
        load_safetensors_dir(w, tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(PayloadError, match="unreadable safetensors file"):
        load_safetensors_dir(w, tmp_path)


def test_bucketed_zero_means_one_tensor_per_bucket_even_for_empty_tensors():
    stream = [("a", torch.zeros(0)), ("b", torch.zeros(0)), ("c", torch.ones(2))]
    assert [[n for n, _ in b] for b in bucketed(stream, 0)] == [["a"], ["b"], ["c"]]


def test_flatten_into_a_reused_buffer():
    named = [("a", torch.arange(3, dtype=torch.bfloat16)), ("b", torch.randn(2, 2))]
    buf = torch.full((64,), 255, dtype=torch.uint8)
    flat, entries = flatten(named, out=buf)
    assert flat.data_ptr() == buf.data_ptr() and flat.numel() == entries[-1].end_idx
    for (n, t), (m, u) in zip(named, unflatten(flat, entries)):
        assert n == m and torch.equal(t, u)
    with pytest.raises(ValueError, match=">= 24 bytes"):
        flatten(named, out=torch.empty(10, dtype=torch.uint8))


def test_all_finite_finds_every_nan_and_infinity_and_no_overflowing_sum():
    from megatron_spin.rollout.embedded.weights import all_finite

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        t = torch.randn(1000, dtype=dtype)
        assert all_finite(t)
        for bad in (float("nan"), float("inf"), float("-inf")):
            u = t.clone()
            u[517] = bad
            assert not all_finite(u), (dtype, bad)
        both = t.clone()
        both[3], both[9] = float("inf"), float("-inf")  # their sum is NaN, still caught
        assert not all_finite(both)
    huge = torch.full((1000,), torch.finfo(torch.float32).max / 2)  # finite, but the sum overflows
    assert all_finite(huge) and all_finite(torch.full((1000,), torch.finfo(torch.float16).max, dtype=torch.float16))
