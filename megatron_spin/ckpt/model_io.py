"""Load and save the weights of built Megatron model chunks through dist_checkpointing.

Works at any TP/PP/VPP layout: Megatron maps each rank's shards onto the layout-free keys
of the checkpoint.  ``_extra_state`` entries (TE's FP8 bookkeeping) that a checkpoint lacks
— a converted HF model has none — are skipped; every weight must be present.  Loading reads
the checkpoint as data (``ckpt.safe_load``): a crafted file is refused, never run.
"""

from __future__ import annotations

import os
from pathlib import Path

from megatron_spin.ckpt.atomic import publish_dir
from megatron_spin.ckpt.metadata import copy_identity
from megatron_spin.ckpt.safe_load import read_dcp_metadata


def sharded_model_state(chunks: list) -> dict:
    if len(chunks) == 1:
        return chunks[0].sharded_state_dict()
    return {f"model{i}": c.sharded_state_dict() for i, c in enumerate(chunks)}


def _drop_missing_extra_state(sharded: dict, present: set[str]) -> None:
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    for key in list(sharded):
        value = sharded[key]
        if isinstance(value, dict):
            _drop_missing_extra_state(value, present)
        elif isinstance(value, ShardedObject) and key.endswith("_extra_state") and value.unique_key not in present:
            del sharded[key]


def load_model_weights(chunks: list, ckpt_dir: str | os.PathLike) -> None:
    """Fill ``chunks`` (this rank's model chunks) from a Megatron dist checkpoint."""
    from megatron_spin.ckpt.dist_load import load_dist_checkpoint

    ckpt_dir = Path(ckpt_dir)
    if not (ckpt_dir / "metadata.json").exists():
        raise FileNotFoundError(f"{ckpt_dir}: not a complete Megatron dist checkpoint (no metadata.json)")
    present = set(read_dcp_metadata(ckpt_dir).state_dict_metadata)
    sharded = sharded_model_state(chunks)
    _drop_missing_extra_state(sharded, present)
    state = load_dist_checkpoint(sharded, ckpt_dir)
    per_chunk = [state] if len(chunks) == 1 else [state[f"model{i}"] for i in range(len(chunks))]
    for chunk, sd in zip(chunks, per_chunk):
        missing, unexpected = chunk.load_state_dict(sd, strict=False)
        missing = [k for k in missing if not k.endswith("_extra_state")]
        if missing or unexpected:
            raise RuntimeError(f"{ckpt_dir}: missing weights {missing}, unexpected {unexpected}")


def save_model_weights(chunks: list, ckpt_dir: str | os.PathLike) -> None:
    """Collective: every rank calls it; writes the layout-free dist checkpoint into ``ckpt_dir``.

    Not atomic by itself (see :func:`publish_model_checkpoint`).
    """
    from megatron.core import dist_checkpointing

    Path(ckpt_dir).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(sharded_model_state(chunks), str(ckpt_dir))


def publish_model_checkpoint(
    chunks: list, out_dir: str | os.PathLike, *, source_dir: str | os.PathLike, replace: bool = True
) -> Path:
    """Collective, atomic save of a trained model as a megatron_spin checkpoint.

    Writes the weights into a hidden sibling, adds the metadata and ``hf/`` files of
    ``source_dir`` (the checkpoint training started from: architecture, tokenizer, HF dtypes
    for export), then rank 0 renames it into place.  The result loads with
    ``load_model_weights``, trains again, and exports with tools/convert_megatron_to_hf.py.
    """
    import shutil

    import torch.distributed as dist

    out, src = Path(out_dir), Path(source_dir)
    tmp = out.parent / f".{out.name}.tmp-save"  # same name on every rank, no broadcast needed
    if dist.get_rank() == 0:
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier save
    dist.barrier()
    save_model_weights(chunks, tmp)
    dist.barrier()
    if dist.get_rank() == 0:
        copy_identity(src, tmp)
        publish_dir(tmp, out, replace=replace)
    dist.barrier()
    return out
