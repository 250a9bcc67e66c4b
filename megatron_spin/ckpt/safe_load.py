"""Read a checkpoint as data: nothing in a checkpoint file can make the reader run code.

Checkpoints come from shared filesystems and the internet, and most files of a Megatron dist
checkpoint are pickles, which can name any importable callable to be called while they load.
The rule:

  * ``.metadata`` (torch.distributed.checkpoint's index of the checkpoint: a plain pickle) is
    read by :class:`_MetadataUnpickler`.  It resolves only the record types torch DCP and
    megatron-core 0.16 write there (``_RECORD_TYPES``, every one a plain data class, enum or
    value type; found by reading both writers and dumping real checkpoints of every layout
    and optimizer this project saves), torch dtypes, and ``torch.serialization._get_layout``
    (how a ``torch.layout`` pickles).  It sets attributes (the BUILD opcode) only on
    instances of those record types, so a pickle cannot rewrite a class either.  The result
    must be a ``Metadata``.
  * Every other pickled piece — ``common.pt``, a ShardedObject stored as a DCP bytes item,
    the RNG files — goes through :func:`load_checkpoint_object`: ``torch.load`` with
    ``weights_only=True`` passed explicitly (torch's own restricted unpickler: tensors,
    containers, numbers, strings and the data classes torch and megatron-core register as
    safe).  Passed explicitly, no ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` can turn it off.
    Tensor items of the DCP files are read by torch with ``weights_only=True`` already.

Anything else is refused with :class:`UnsafeCheckpointError`, naming the file and the global
(or opcode target) that was refused.  :class:`SafeFileSystemReader` is the DCP reader that
applies the rule to a whole checkpoint directory; ``ckpt.dist_load`` hands it to Megatron.
Loads through it run inside :func:`raising_refusals`, so a refusal reaches the caller as itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import re
from pathlib import Path
from typing import Any, BinaryIO

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

METADATA_FILE = ".metadata"  # torch DCP's name for the checkpoint's index

_DCP = "torch.distributed.checkpoint"
_RECORD_TYPES = frozenset({
    # The index itself and what it holds per state-dict key and per stored chunk.
    (f"{_DCP}.metadata", "Metadata"),
    (f"{_DCP}.metadata", "StorageMeta"),
    (f"{_DCP}.metadata", "TensorStorageMetadata"),
    (f"{_DCP}.metadata", "BytesStorageMetadata"),
    (f"{_DCP}.metadata", "ChunkStorageMetadata"),
    (f"{_DCP}.metadata", "TensorProperties"),
    (f"{_DCP}.metadata", "_MEM_FORMAT_ENCODING"),  # TensorProperties' memory_format, as an enum
    (f"{_DCP}.metadata", "MetadataIndex"),
    # Where each item lies: FileSystemWriter's storage_data (file, offset, length), file prefixes.
    (f"{_DCP}.filesystem", "_StorageInfo"),
    (f"{_DCP}.filesystem", "_StoragePrefix"),
    # megatron-core stores every rank's save plan in the index (``Metadata.all_local_plans``).
    (f"{_DCP}.planner", "SavePlan"),
    (f"{_DCP}.planner", "WriteItem"),
    (f"{_DCP}.planner", "WriteItemType"),
    (f"{_DCP}.planner", "TensorWriteData"),
    (f"{_DCP}.planner", "BytesIOWriteData"),
    ("torch", "Size"),
    # StorageMeta.checkpoint_id when the writer was given a Path.
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    # Empty classes megatron-core keeps so that indexes written by 0.15 still load.
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreMetadata"),
    ("megatron.core.dist_checkpointing.strategies.torch", "MCoreSavePlan"),
})
_FUNCTIONS = frozenset({("torch.serialization", "_get_layout")})  # "torch.strided" -> torch.strided

_WEIGHTS_ONLY_REASON = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\n|\. Please use|$)", re.DOTALL)


class UnsafeCheckpointError(ValueError):
    """A checkpoint file holds something other than checkpoint data (a pickle that names a
    global outside the allow-list, or builds something it may not); nothing of it was run."""


class _MetadataUnpickler(pickle._Unpickler):
    """The pure-Python unpickler (its opcode table can be extended, the C one's cannot) with
    globals and BUILD restricted as the module docstring states."""

    def __init__(self, file: BinaryIO, where: str):
        super().__init__(file)
        self._where = where
        self._records: set[type] = set()

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # no lazy imports
            return vars(torch)[name]
        if (module, name) in _RECORD_TYPES:
            cls = super().find_class(module, name)
            self._records.add(cls)
            return cls
        if (module, name) in _FUNCTIONS:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(f"{self._where}: refusing to load global {module}.{name} "
                                    "(only torch.distributed.checkpoint record types are accepted)")

    def _load_build(self) -> None:
        # BUILD sets attributes on the object below it on the stack; on a class (or a function)
        # that would rewrite it for the whole process.  Only instances of records may be built.
        target = self.stack[-2]
        if type(target) not in self._records:
            raise UnsafeCheckpointError(f"{self._where}: refusing to set attributes on {target!r} "
                                        "(only checkpoint records are built)")
        pickle._Unpickler.load_build(self)

    dispatch = {**pickle._Unpickler.dispatch, pickle.BUILD[0]: _load_build}


def read_dcp_metadata(ckpt_dir: str | os.PathLike, rank: int | None = None) -> Metadata:
    """The DCP index (``.metadata``, or rank ``rank``'s ``__{rank}.metadata``) of ``ckpt_dir``,
    unpickled under the allow-list."""
    path = Path(ckpt_dir) / (METADATA_FILE if rank is None else f"__{rank}{METADATA_FILE}")
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, str(path)).load()
        except UnsafeCheckpointError:
            raise
        except Exception as exc:  # truncated or garbled: the pure-Python unpickler fails in many ways
            raise UnsafeCheckpointError(f"{path}: not a readable checkpoint index ({type(exc).__name__}: "
                                        f"{exc})") from None
    if not isinstance(metadata, Metadata):
        raise UnsafeCheckpointError(f"{path}: holds a {type(metadata).__name__}, not a checkpoint index (Metadata)")
    return metadata


def load_checkpoint_object(source: str | os.PathLike | BinaryIO, where: str | None = None) -> Any:
    """``torch.load(source, weights_only=True)`` onto the CPU; a refusal is an
    :class:`UnsafeCheckpointError` naming ``where`` (default: the path) and what torch refused."""
    where = where or str(source)
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(f"{where}: refusing to load it: {_reason(exc)} "
                                    "(only tensors and plain data are accepted)") from None


def _reason(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused, without its advice to load unrestricted."""
    found = _WEIGHTS_ONLY_REASON.search(str(exc))
    return " ".join(found.group(1).split()) if found else str(exc).splitlines()[0]


@contextlib.contextmanager
def raising_refusals():
    """Around a DCP load: DCP reports a failed step as a ``CheckpointException`` (a BaseException
    listing every rank's error); a refusal among them is raised as itself, on every rank."""
    try:
        yield
    except CheckpointException as exc:
        for error, _trace in exc.failures.values():
            if isinstance(error, UnsafeCheckpointError):
                raise error from None
        raise


class _WeightsOnlyBytes:
    """The load planner as ``FileSystemReader.read_data`` sees it, except that a bytes item is
    unpickled by :func:`load_checkpoint_object` (torch's ``DefaultLoadPlanner.load_bytes``, which
    Megatron's planner inherits, calls ``torch.load(weights_only=False)``)."""

    def __init__(self, planner, reader: "SafeFileSystemReader"):
        self._planner, self._reader = planner, reader

    def __getattr__(self, name: str) -> Any:  # resolve_tensor, commit_tensor, ...: the planner's own
        return getattr(self._planner, name)

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        info = self._reader.storage_data[read_item.storage_index]
        where = f"{Path(self._reader.path) / info.relative_path} (item {read_item.storage_index.fqn})"
        obj = load_checkpoint_object(value, where)
        # The planner takes bytes and unpickles them without restriction: it gets a pickle made
        # here of what weights-only unpickling admitted, which can rebuild nothing else.
        vetted = io.BytesIO()
        torch.save(obj, vetted)
        vetted.seek(0)
        self._planner.load_bytes(read_item, vetted)


class SafeFileSystemReader(FileSystemReader):
    """torch DCP's file-system reader with the module's rule applied: the index through the
    allow-list (read once per reader and kept, so every load step sees the same vetted index),
    bytes items weights-only.  Drop-in wherever a ``FileSystemReader`` is used."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(path)
        self._metadata: dict[int | None, Metadata] = {}
        self._reading = None  # the stored item read last (names the file in a refusal)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        if rank not in self._metadata:
            self._metadata[rank] = read_dcp_metadata(self.path, rank)
        metadata = self._metadata[rank]
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id  # as FileSystemReader does (reset() renews it)
        return metadata

    def _slice_file(self, file, sinfo):
        self._reading = sinfo
        return super()._slice_file(file, sinfo)

    def read_data(self, plan, planner):
        self._reading = None
        try:
            return super().read_data(plan, _WeightsOnlyBytes(planner, self))
        except pickle.UnpicklingError as exc:  # torch's weights-only load of a tensor item refused it
            item = self._reading
            where = Path(self.path) / item.relative_path if item is not None else Path(self.path)
            at = f" at bytes {item.offset}+{item.length}" if item is not None else ""
            raise UnsafeCheckpointError(f"{where}{at}: refusing a tensor item: {_reason(exc)} "
                                        "(only tensors are accepted)") from None
