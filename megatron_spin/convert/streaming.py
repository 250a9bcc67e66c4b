"""Stream a model between HF safetensors and a Megatron distributed checkpoint, one tensor at a time.

A Megatron ``torch_dist`` checkpoint is a torch.distributed.checkpoint (DCP) directory whose
tensor keys are Megatron's *sharded keys* (layer index folded into a leading axis, e.g.
``decoder.layers.self_attention.linear_qkv.weight`` of shape ``[L, qkv, hidden]``) plus
``metadata.json`` and ``common.pt``.  Because keys and global shapes do not depend on the
parallel layout, such a checkpoint loads at any TP/PP.

Writing: the checkpoint layout (keys, global shapes, chunk offsets, the SwiGLU split) is read
from Megatron itself — the model is built on the meta device at TP=1/PP=1, which costs no
memory even at 70B — and each chunk's data is produced lazily, when DCP's writer asks for it,
from the HF tensors through the converter table.  With one writer thread DCP resolves chunks
serially, so peak memory is about one layer's tensor, not the model.

Reading: each parameter's region for one layer is read straight from the DCP files, through
``ckpt.safe_load``'s reader (the checkpoint is read as data; a crafted index is refused).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import load as dcp_load
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import LoadPlan, SavePlan, TensorWriteData, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from megatron_spin.ckpt.metadata import mark_complete, write_spin_metadata
from megatron_spin.ckpt.safe_load import SafeFileSystemReader, raising_refusals
from megatron_spin.convert import converter_for
from megatron_spin.convert.table import ConverterTable, Param
from megatron_spin.models.builder import build_model
from megatron_spin.spec.arch import ModelArch


def _layout_model(arch: ModelArch, pctx):
    """TP=1/PP=1 Megatron model on the meta device (needs a 1-rank ParallelContext)."""
    if pctx.layout.tp != 1 or pctx.layout.pp != 1:
        raise RuntimeError("the checkpoint layout is read at TP=1, PP=1")
    (model,) = build_model(arch, pctx, init_weights=False, on_meta=True)
    return model


class _Chunk:
    """One DCP write item: a slice of a Megatron sharded tensor and how to produce it."""
    def __init__(self, sh_ten, param: Param, produce: Callable[[], torch.Tensor]):
        self.key = sh_ten.key
        self.param = param
        self.offsets = tuple(sh_ten.global_offset)
        self.sizes = (1,) * sh_ten.prepend_axis_num + tuple(sh_ten.local_shape)
        self.global_shape = tuple(sh_ten.global_shape)
        self.produce = produce


def _plan_chunks(arch: ModelArch, pctx, table: ConverterTable, read_hf, dtype: Optional[torch.dtype]) -> list[_Chunk]:
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    model = _layout_model(arch, pctx)
    chunks: list[_Chunk] = []
    last: dict[str, torch.Tensor] = {}  # one-entry cache: factories split one tensor in two chunks

    def full(param: Param) -> torch.Tensor:
        if param.megatron not in last:
            last.clear()
            t = table.to_megatron(arch, param, read_hf)
            last[param.megatron] = t if dtype is None else t.to(dtype)
        return last[param.megatron]

    for state_key, obj in model.sharded_state_dict().items():
        if state_key.endswith("._extra_state"):
            continue  # no FP8/TE state in a converted model; loaders tolerate its absence
        param = table.param(state_key)
        if isinstance(obj, ShardedTensor):
            def produce(param=param, shape=obj.local_shape, pre=obj.prepend_axis_num):
                return full(param).reshape((1,) * pre + tuple(shape))
            chunks.append(_Chunk(obj, param, produce))
        elif isinstance(obj, ShardedTensorFactory):
            # Build once on meta to learn the sub-tensors' keys/offsets; rebuild on real data later.
            for i, sub in enumerate(obj.build()):
                def produce(param=param, obj=obj, i=i):
                    built = obj.build_fn(obj.key, full(param), obj.replica_id, obj.flattened_range)
                    s = built[i]
                    return s.data.reshape((1,) * s.prepend_axis_num + tuple(s.local_shape))
                chunks.append(_Chunk(sub, param, produce))
        else:
            raise TypeError(f"unexpected sharded object for {state_key}: {type(obj).__name__}")
    return chunks


class _LazySavePlanner(DefaultSavePlanner):
    """A DCP planner whose write items come from ``_Chunk``s and whose data is made on demand."""
    def __init__(self, chunks: list[_Chunk], dtype_of: Callable[[_Chunk], torch.dtype], progress=None):
        super().__init__(flatten_state_dict=False, dedup_replicated_tensors=None)
        self._chunks = {MetadataIndex(c.key, torch.Size(c.offsets)): c for c in chunks}
        self._dtype_of = dtype_of
        self._progress = progress
        self._done = 0

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=True):
        self.state_dict, self.is_coordinator = state_dict, is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for index, c in self._chunks.items():
            items.append(WriteItem(
                index=index,
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(c.offsets), sizes=torch.Size(c.sizes)),
                    properties=TensorProperties(dtype=self._dtype_of(c)),
                    size=torch.Size(c.global_shape),
                ),
            ))
        self.plan = SavePlan(items)
        return self.plan

    def resolve_data(self, write_item: WriteItem) -> torch.Tensor | io.BytesIO:
        chunk = self._chunks[MetadataIndex(write_item.index.fqn, write_item.index.offset)]
        tensor = chunk.produce().contiguous()
        if tuple(tensor.shape) != chunk.sizes:
            raise RuntimeError(f"{chunk.key}@{chunk.offsets}: produced {tuple(tensor.shape)}, planned {chunk.sizes}")
        self._done += 1
        if self._progress:
            where = f"layer {chunk.offsets[0]}" if chunk.key.startswith("decoder.layers.") else ""
            self._progress(self._done, len(self._chunks), f"{chunk.key} {where}".strip())
        return tensor


def write_megatron_checkpoint(
    arch: ModelArch,
    pctx,
    out_dir: str | os.PathLike,
    read_hf: Callable[[str], torch.Tensor],
    hf_dtype_of: Callable[[str], torch.dtype],
    *,
    dtype: Optional[torch.dtype] = None,
    extra_metadata: Optional[dict] = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
) -> int:
    """Write ``arch``'s weights (read lazily by HF name) as a Megatron dist checkpoint.

    ``pctx`` is a 1-rank ParallelContext (``parallel.launch`` + ``init_parallel``).
    ``dtype`` casts the stored tensors (default: keep the HF dtype).  Returns the chunk count.
    The caller makes the directory appear atomically (it writes into a temporary one).
    """
    table = converter_for(arch)
    chunks = _plan_chunks(arch, pctx, table, read_hf, dtype)

    def dtype_of(c: _Chunk) -> torch.dtype:
        if dtype is not None:
            return dtype
        return hf_dtype_of(c.param.hf[0])

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = FileSystemWriter(out, single_file_per_rank=True, thread_count=1, sync_files=True)
    with warnings.catch_warnings():  # no_dist is deliberate: one writer process
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp_save({}, storage_writer=writer, planner=_LazySavePlanner(chunks, dtype_of, progress), no_dist=True)
    torch.save({}, out / "common.pt")
    write_spin_metadata(out, arch, extra_metadata)
    mark_complete(out)  # last: marks a complete checkpoint
    return len(chunks)


class _ChunkLoadPlanner(DefaultLoadPlanner):
    """Reads named regions of checkpoint tensors into caller-owned buffers.

    Unlike a whole-state-dict load, a request may cover part of a tensor (one layer of the
    stacked ``[L, ...]`` weights), whatever chunking the writer used (any TP/PP layout).
    """

    def __init__(self, requests: dict[str, tuple[tuple[int, ...], torch.Tensor]]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._requests = requests

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.metadata, self.is_coordinator = metadata, is_coordinator

    def create_local_plan(self) -> LoadPlan:
        items = []
        for fqn, (offsets, dest) in self._requests.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if md is None:
                raise KeyError(f"tensor {fqn!r} is not in the checkpoint")
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            items += create_read_items_for_chunk_list(fqn, md, [chunk])
        self.plan = LoadPlan(items)
        return self.plan

    def resolve_tensor(self, read_item):
        _, dest = self._requests[read_item.dest_index.fqn]
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            dest = dest.narrow(dim, start, length)
        return dest

    def commit_tensor(self, read_item, tensor) -> None:
        pass  # resolve_tensor returned a view of the destination: already in place


def iter_megatron_checkpoint(arch: ModelArch, pctx, ckpt_dir: str | os.PathLike) -> Iterator[tuple[Param, torch.Tensor]]:
    """Yield (param, full TP=1 tensor) from a dist checkpoint, one layer (or expert) at a time.

    ``pctx`` is a 1-rank ParallelContext (Megatron's meta model names the sharded key of each
    parameter).  The stored layout of every key is TP-independent (fused QKV rows grouped by
    KV head, SwiGLU ``[gate; up]``), so one region read per parameter and layer gives the full
    tensor, whatever layout saved the checkpoint.
    """
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    ckpt_dir = Path(ckpt_dir)
    table = converter_for(arch)
    reader = SafeFileSystemReader(ckpt_dir)
    stored = reader.read_metadata().state_dict_metadata
    # Stored keys fold the layer (and, for MoE experts, the expert) into leading axes; one DCP read
    # per (layer, expert) group, since the experts of a layer share their stored keys.
    groups: dict[tuple[int, ...], list[tuple[Param, str]]] = {}
    for state_key, obj in _layout_model(arch, pctx).sharded_state_dict().items():
        if not isinstance(obj, (ShardedTensor, ShardedTensorFactory)):
            continue
        param = table.param(state_key)
        leading = tuple(i for i in (param.layer, param.expert) if i is not None)
        groups.setdefault(leading, []).append((param, obj.key))
    for leading in sorted(groups):
        requests, order = {}, []
        for param, key in groups[leading]:
            md = stored[key]
            shape = tuple(md.size)[len(leading):]
            dest = torch.empty((1,) * len(leading) + shape, dtype=md.properties.dtype)
            requests[key] = (leading + (0,) * len(shape), dest)
            order.append((param, key, shape))
        with warnings.catch_warnings(), raising_refusals():
            warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
            dcp_load({}, storage_reader=reader, planner=_ChunkLoadPlanner(requests), no_dist=True)
        for param, key, shape in order:
            yield param, requests[key][1].reshape(shape)
