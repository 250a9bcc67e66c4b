"""Stream tensors in and out of Hugging Face safetensors directories.

Reading opens each shard lazily (safetensors memory-maps it) and returns one tensor at a
time; writing buffers up to ``max_shard_bytes`` before flushing a shard.  Peak memory is
therefore about one shard plus the tensors in flight, never the whole model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Files copied verbatim between HF directories and the Megatron checkpoint's hf/ folder.
HF_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class HFCheckpointError(ValueError):
    pass


class HFReader:
    """Tensor-by-tensor reader for a safetensors HF model directory."""

    def __init__(self, hf_dir: str | os.PathLike):
        self.dir = Path(hf_dir)
        index = self.dir / INDEX_NAME
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise HFCheckpointError(f"{index}: not a valid safetensors index ({e})") from None
            self._file_of = dict(weight_map)
        elif (self.dir / SINGLE_NAME).exists():
            with safe_open(self.dir / SINGLE_NAME, "pt") as f:
                self._file_of = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise HFCheckpointError(
                f"{self.dir}: no {SINGLE_NAME} or {INDEX_NAME} (only safetensors checkpoints are read)"
            )
        missing = sorted({f for f in self._file_of.values() if not (self.dir / f).exists()})
        if missing:
            raise HFCheckpointError(f"{self.dir}: files listed in {INDEX_NAME} are missing: {missing}")
        self._handles: dict[str, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def _handle(self, name: str):
        try:
            fname = self._file_of[name]
        except KeyError:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} is not in the checkpoint") from None
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.dir / fname, "pt")
        return self._handles[fname]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def dtype(self, name: str) -> torch.dtype:
        """The stored dtype, read from the header without loading the tensor."""
        return SAFETENSORS_DTYPES[self._handle(name).get_slice(name).get_dtype()]

    def file_paths(self) -> list[Path]:
        return sorted({self.dir / f for f in self._file_of.values()})

    def close(self) -> None:
        self._handles.clear()


class HFShardedWriter:
    """Write tensors as ``model-0000i-of-0000N.safetensors`` shards plus an index."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise HFCheckpointError(f"{self.dir}: tensor {name!r} added twice")
        self._names.add(name)
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self._total += nbytes

    def _flush(self) -> None:
        idx = len(self._shards)
        save_file(self._pending, self.dir / f"shard-{idx:05d}.tmp", metadata={"format": "pt"})
        self._shards.append(list(self._pending))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> None:
        if self._pending:
            self._flush()
        n = len(self._shards)
        if n == 0:
            raise HFCheckpointError(f"{self.dir}: no tensors were written")
        # A reused directory may hold an older export: a stale index would win over a new
        # single file, and stale shards would be read through it.
        finals = {SINGLE_NAME} if n == 1 else {f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)}
        for stale in [self.dir / INDEX_NAME, self.dir / SINGLE_NAME, *self.dir.glob("model-*-of-*.safetensors")]:
            if stale.name not in finals:
                stale.unlink(missing_ok=True)
        if n == 1:
            os.replace(self.dir / "shard-00000.tmp", self.dir / SINGLE_NAME)
            return
        weight_map = {}
        for i, names in enumerate(self._shards):
            final = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.dir / f"shard-{i:05d}.tmp", self.dir / final)
            weight_map.update({k: final for k in names})
        (self.dir / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": self._total}, "weight_map": weight_map}, indent=2)
        )


def copy_side_files(src: str | os.PathLike, dst: str | os.PathLike, names: Iterable[str] = HF_SIDE_FILES) -> list[str]:
    """Copy config and tokenizer files that exist in ``src``; returns the names copied."""
    copied = []
    Path(dst).mkdir(parents=True, exist_ok=True)
    for name in names:
        if (Path(src) / name).exists():
            shutil.copy2(Path(src) / name, Path(dst) / name)
            copied.append(name)
    return copied
