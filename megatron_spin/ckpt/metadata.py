"""What makes a directory a megatron_spin checkpoint: Megatron's ``metadata.json`` (written last,
so its presence means complete), our ``megatron_spin.json`` (the architecture record) and the
``hf/`` folder of the source model's config and tokenizer (for export and for the engines).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Optional

from megatron_spin.spec.arch import ModelArch

MEGATRON_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
SPIN_METADATA = "megatron_spin.json"
HF_SUBDIR = "hf"  # config + tokenizer files of the source HF model, for export


def write_spin_metadata(out: Path, arch: ModelArch, extra: Optional[dict] = None) -> None:
    (out / SPIN_METADATA).write_text(json.dumps({"arch": dataclasses.asdict(arch), **(extra or {})}, indent=2))


def copy_identity(source_dir: str | os.PathLike, out: str | os.PathLike) -> None:
    """Give the weights in ``out`` the identity of the model in ``source_dir``: its architecture
    record and ``hf/`` folder, so that ``out`` loads, exports and serves on its own."""
    src, out = Path(source_dir), Path(out)
    shutil.copy2(src / SPIN_METADATA, out / SPIN_METADATA)
    if (src / HF_SUBDIR).exists():
        shutil.copytree(src / HF_SUBDIR, out / HF_SUBDIR, dirs_exist_ok=True)


def mark_complete(out: Path) -> None:
    (out / "metadata.json").write_text(json.dumps(MEGATRON_METADATA))


def read_arch(megatron_dir: str | os.PathLike) -> ModelArch:
    path = Path(megatron_dir) / SPIN_METADATA
    if not (Path(megatron_dir) / "metadata.json").exists():
        raise FileNotFoundError(f"{megatron_dir}: not a complete Megatron dist checkpoint (no metadata.json)")
    try:
        return ModelArch(**json.loads(path.read_text())["arch"])
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing; was this checkpoint written by megatron_spin?") from None
