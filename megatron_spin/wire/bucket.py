"""Buckets: group a stream of named tensors into pushes of about ``bucket_bytes`` each.

Pushing tensor by tensor costs one request (and one engine-side load) per tensor — about
10× slower than bucketed pushes on real models (verl#2418) — while one push of the whole
model needs a second full copy of it.  A bucket bounds both: the pusher holds at most one
bucket (plus the tensor being added) at a time.

A *flat* bucket packs a bucket's bytes into one contiguous uint8 tensor with a table of
(name, dtype, shape, byte offset): one shared-memory segment (or one broadcast) per bucket
instead of one per tensor.
"""

from __future__ import annotations

import dataclasses
import types
from typing import Iterable, Iterator, Optional, Sequence

import torch

NamedTensors = list[tuple[str, torch.Tensor]]


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def bucketed(stream: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[NamedTensors]:
    """Consecutive groups of ``stream`` whose sizes reach ``bucket_bytes`` (a tensor larger than
    a bucket travels alone).  ``bucket_bytes <= 0`` means one tensor per bucket."""
    bucket: NamedTensors = []
    size = 0
    for name, tensor in stream:
        if bucket and (bucket_bytes <= 0 or size + nbytes(tensor) > bucket_bytes):
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += nbytes(tensor)
    if bucket:
        yield bucket


@dataclasses.dataclass(frozen=True)
class FlatEntry:
    """One tensor of a flat bucket; the fields are SGLang's ``FlattenedTensorMetadata`` (byte
    offsets, as SGLang >= 0.5.10 reads them), so one wire format serves both engines."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start_idx: int  # bytes into the flat buffer
    end_idx: int
    numel: int  # bytes, as SGLang's own producers write it (no reader uses it)

    def to_wire(self) -> types.SimpleNamespace:
        # SimpleNamespace: SGLang's restricted unpickler admits it, and it needs no import of ours.
        return types.SimpleNamespace(name=self.name, shape=torch.Size(self.shape), dtype=self.dtype,
                                     start_idx=self.start_idx, end_idx=self.end_idx, numel=self.numel)

    @classmethod
    def from_wire(cls, item) -> "FlatEntry":
        try:
            return cls(str(item.name), tuple(int(s) for s in item.shape), item.dtype, int(item.start_idx),
                       int(item.end_idx), int(item.numel))
        except AttributeError as exc:
            raise ValueError(f"metadata entry lacks a field ({exc})") from None


def flat_layout(named: Sequence[tuple[str, torch.Tensor]]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a flat bucket, and the bucket's size.

    Each tensor starts at a multiple of its element size (a bf16 tensor of odd length must not
    leave the next fp32 tensor misaligned: views need aligned offsets).
    """
    offsets, offset = [], 0
    for _, t in named:
        offset = -(-offset // t.element_size()) * t.element_size()
        offsets.append(offset)
        offset += nbytes(t)
    return offsets, offset


def flatten(named: Sequence[tuple[str, torch.Tensor]], shared: bool = False,
            out: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, list[FlatEntry]]:
    """One uint8 buffer ``[sum of nbytes]`` holding every tensor's bytes, and their table.

    ``out``: a uint8 buffer to fill (at least :func:`flat_layout`'s size; the result is a view of
    it), so that a transport can reuse one shared-memory buffer for every bucket instead of
    faulting in fresh pages each time.  Otherwise ``shared=True`` allocates a CPU buffer in
    shared memory up front: sending it to an engine process then costs this one copy.
    """
    offsets, total = flat_layout(named)
    device = named[0][1].device if named else torch.device("cpu")
    if out is not None:
        if out.dtype != torch.uint8 or out.numel() < total or out.device != device:
            raise ValueError(f"flatten: out must be a uint8 buffer of >= {total} bytes on {device}")
        flat = out[:total]
    else:
        flat = torch.empty(total, dtype=torch.uint8, device=device)
        if shared and device.type == "cpu":
            flat.share_memory_()
    entries = []
    for (name, t), start in zip(named, offsets):
        size = nbytes(t)
        flat[start:start + size].copy_(t.detach().contiguous().reshape(-1).view(torch.uint8))
        entries.append(FlatEntry(name, tuple(t.shape), t.dtype, start, start + size, size))
    return flat, entries


def unflatten(flat: torch.Tensor, entries: Sequence[FlatEntry]) -> NamedTensors:
    """Views into ``flat`` for each entry; raises ValueError on an inconsistent table.  ``numel``
    is not read (SGLang's producers write bytes there, ours too; older ones wrote elements)."""
    if flat.dtype != torch.uint8 or flat.dim() != 1:
        raise ValueError(f"flat bucket must be a 1-D uint8 tensor, got {flat.dtype} {tuple(flat.shape)}")
    out = []
    for e in entries:
        if not isinstance(e.dtype, torch.dtype):
            raise ValueError(f"{e.name}: dtype {e.dtype!r} is not a torch dtype")
        numel = 1
        for s in e.shape:
            numel *= s
        itemsize = torch.empty((), dtype=e.dtype).element_size()
        size = e.end_idx - e.start_idx
        if size != numel * itemsize or e.start_idx < 0 or e.end_idx > flat.numel() or e.start_idx % itemsize:
            raise ValueError(f"{e.name}: entry (bytes {e.start_idx}:{e.end_idx}, shape {e.shape}, {e.dtype}) "
                             f"does not fit a {flat.numel()}-byte bucket")
        out.append((e.name, flat[e.start_idx:e.end_idx].view(e.dtype).reshape(e.shape)))
    return out
