"""Load a Megatron dist checkpoint through megatron-core, reading the checkpoint as data.

    state = load_dist_checkpoint(sharded_state_dict, ckpt_dir)   # collective, as dist_checkpointing.load

``dist_checkpointing.load`` takes its two load strategies as arguments; these are megatron-core
0.16's ``torch_dist`` / ``torch`` strategies with every file read replaced by ``ckpt.safe_load``:

  * sharded (``.metadata``, the ``*.distcp`` files): ``TorchDistLoadShardedStrategy`` creates its
    DCP reader inside ``load`` (module function ``_get_filesystem_reader``, no parameter), so
    ``load`` is restated here around :class:`SafeFileSystemReader` from megatron's own helpers,
    step for step; its metadata queries read through the same allow-list.
  * common (``common.pt``): megatron's ``torch.load`` passes no ``weights_only``, which the
    ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` environment variable turns into an unrestricted load.

Given explicitly, the strategies are no longer chosen by ``metadata.json``'s backend names, so
they check those names themselves.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import dict_list_map_inplace, nested_values
from megatron.core.dist_checkpointing.mapping import CheckpointingException, ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME, TorchCommonLoadStrategy
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from megatron_spin.ckpt.safe_load import (
    SafeFileSystemReader,
    load_checkpoint_object,
    raising_refusals,
    read_dcp_metadata,
)


def _require_backend(kind: str, found: str, expected: str) -> None:
    if found != expected:
        raise CheckpointingException(f"metadata.json names {kind} {found!r}; only {expected!r} checkpoints are read")


class _SafeTorchDistLoad(mcore_torch.TorchDistLoadShardedStrategy):
    def check_backend_compatibility(self, loaded_backend):
        _require_backend("sharded_backend", loaded_backend, "torch_dist")

    def load(self, sharded_state_dict, checkpoint_dir):
        tensors = [t for t in nested_values(sharded_state_dict) if isinstance(t, ShardedTensor)]
        by_key, flat_mapping, rename_mapping = mcore_torch._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict)
        pyt_state_dict = mcore_torch.mcore_to_pyt_state_dict(by_key, True)
        reader = SafeFileSystemReader(checkpoint_dir)
        # Read (and vet) the index before DCP does: DCP catches a failed read, retries rank-local
        # index files and reports a bare "metadata is None", burying the refusal.
        reader.read_metadata()
        planner = mcore_torch.MCoreLoadPlanner(
            shapes_validation_sharded_tensors=[t for t in tensors if not t.allow_shape_mismatch],
            allow_shape_mismatch_sharded_tensors={t.key: t for t in tensors if t.allow_shape_mismatch},
        )
        with raising_refusals():
            dcp.load_state_dict(pyt_state_dict, reader, planner=planner)
        self.cached_global_metadata = reader.read_metadata()  # megatron's save strategy may reuse it
        loaded = {k: mcore_torch._unwrap_pyt_sharded_tensor(v) for k, v in pyt_state_dict.items()}
        loaded = mcore_torch._replace_sharded_keys_with_state_dict_keys(loaded, flat_mapping, rename_mapping)
        mcore_torch._restore_dict_types(loaded, sharded_state_dict)
        return loaded

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        if metadata is None:
            metadata = read_dcp_metadata(checkpoint_dir)
        return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        metadata = read_dcp_metadata(checkpoint_dir)
        objects = [ShardedObject.empty_from_unique_key(key) for key, md in metadata.state_dict_metadata.items()
                   if isinstance(md, BytesStorageMetadata)]
        return {**{o.unique_key: o for o in objects}, **self.load_tensors_metadata(checkpoint_dir, metadata)}


class _SafeCommonLoad(TorchCommonLoadStrategy):
    def check_backend_compatibility(self, loaded_backend):
        _require_backend("common_backend", loaded_backend, "torch")

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CheckpointingException(f"{path}: missing (a Megatron dist checkpoint keeps its common state "
                                         "there)")
        return load_checkpoint_object(path)

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # Megatron asks only when the sharded strategy cannot load ShardedObjects (not torch_dist).
        return dict_list_map_inplace(
            lambda sh_obj: load_checkpoint_object(Path(checkpoint_dir) / f"{sh_obj.unique_key}.pt"),
            sharded_objects_state_dict)


def load_dist_checkpoint(sharded_state_dict: dict, ckpt_dir: str | os.PathLike) -> dict:
    """``dist_checkpointing.load(sharded_state_dict, ckpt_dir)`` with every read under
    ``ckpt.safe_load``'s rule; a crafted file raises ``UnsafeCheckpointError`` naming it."""
    return dist_checkpointing.load(sharded_state_dict, str(ckpt_dir),
                                   sharded_strategy=_SafeTorchDistLoad(), common_strategy=_SafeCommonLoad())
