"""Crafted checkpoints for the safety tests: a real checkpoint with one piece made to run code.

Each piece unpickles, with a plain unpickler, to what it held before *and* runs
``open(marker, "w")`` on the way, so a loader that executes it carries on silently; the tests
look for the marker file.  Deliberately free of ``megatron_spin`` imports, so the same tests can
be run against code without the safe loader and show the marker appearing.
"""

from __future__ import annotations

import dataclasses
import io
import pickle
from pathlib import Path

import torch

INDEX = ".metadata"


class RunsCode:
    """Unpickles to ``None`` by calling ``exec``, which creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def _read_index(ckpt_dir: Path):
    return pickle.loads((Path(ckpt_dir) / INDEX).read_bytes())  # the test's own checkpoint: trusted


def _write_index(ckpt_dir: Path, metadata) -> None:
    (Path(ckpt_dir) / INDEX).write_bytes(pickle.dumps(metadata))


def poison_index(ckpt_dir: Path, marker: Path) -> None:
    """The same ``.metadata`` with a code-running object among its StorageMeta's fields."""
    metadata = _read_index(ckpt_dir)
    metadata.storage_meta.modules = [RunsCode(marker)]
    _write_index(ckpt_dir, metadata)


def poison_common(ckpt_dir: Path, marker: Path) -> None:
    """``common.pt`` (Megatron's common state) holding the same dict plus a code-running value."""
    path = Path(ckpt_dir) / "common.pt"
    common = torch.load(path, weights_only=True)
    torch.save({**common, "x": RunsCode(marker)}, path)


def bytes_keys(ckpt_dir: Path) -> list[str]:
    """The index's bytes items (ShardedObjects), sorted."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    return sorted(k for k, md in _read_index(ckpt_dir).state_dict_metadata.items()
                  if isinstance(md, BytesStorageMetadata))


def tensor_keys(ckpt_dir: Path) -> list[str]:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    return sorted(k for k, md in _read_index(ckpt_dir).state_dict_metadata.items()
                  if isinstance(md, TensorStorageMetadata))


def poison_item(ckpt_dir: Path, fqn: str, marker: Path) -> Path:
    """Point every stored chunk of item ``fqn`` at a pickle that runs code (appended to the
    chunk's ``.distcp`` file); returns that file."""
    metadata = _read_index(ckpt_dir)
    payload = io.BytesIO()
    torch.save([RunsCode(marker)], payload)  # a ShardedObject's bytes are a pickled list
    data = payload.getvalue()
    chunks = [(index, info) for index, info in metadata.storage_data.items() if index.fqn == fqn]
    assert chunks, f"{fqn} is not stored in {ckpt_dir}"
    for index, info in chunks:
        file = Path(ckpt_dir) / info.relative_path
        offset = file.stat().st_size
        with open(file, "ab") as f:
            f.write(data)
        metadata.storage_data[index] = dataclasses.replace(info, offset=offset, length=len(data))
    _write_index(ckpt_dir, metadata)
    return file
