"""Resolve the model a run starts from: an HF directory for the engines, a Megatron checkpoint for the trainer.

``path: packaged:smollm2`` materialises the packaged model (:mod:`megatron_spin.packaged`).
Without an explicit ``megatron_dir`` the HF model is converted once into the cache, under a
name derived from the HF directory's path and config, and reused by later runs.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path
from typing import Optional

from megatron_spin import packaged
from megatron_spin.cache import cache_root
from megatron_spin.ckpt.metadata import read_arch
from megatron_spin.convert.pipeline import convert_hf_to_megatron
from megatron_spin.errors import ConfigError
from megatron_spin.spec.arch import ModelArch, UnsupportedModelError, arch_from_hf_dir


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    hf_dir: Path  # what the engines load (config, tokenizer, weights)
    megatron_dir: Path  # what the trainer ranks load (a Megatron dist checkpoint)


def locate_model(path: str, megatron_dir: Optional[str] = None) -> PreparedModel:
    """Where the model is (nothing converted yet): ``path`` an HF model directory or a packaged
    model name; ``megatron_dir`` a converted checkpoint, else its place in the cache."""
    where = "actor_rollout_ref.model"
    if packaged.is_packaged(path):
        hf = packaged.model_dir(path)
    else:
        hf = Path(path)
        if not (hf / "config.json").exists():
            raise ConfigError(f"{where}.path", f"{path}: no config.json (an HF model directory, or one of "
                                               f"{', '.join(packaged.PREFIX + m for m in packaged.MODELS)})")
    if megatron_dir:
        out = Path(megatron_dir)
        if not (out / "metadata.json").exists():
            raise ConfigError(f"{where}.megatron_dir", f"{megatron_dir}: not a Megatron checkpoint (convert with "
                                                       "tools/convert_hf_to_megatron.py, or leave it unset)")
        return PreparedModel(hf, out)
    key = hashlib.sha256(f"{hf.resolve()}:{(hf / 'config.json').read_text()}".encode()).hexdigest()[:12]
    return PreparedModel(hf, cache_root() / "megatron" / f"{hf.name}-{key}")


def model_arch(model: PreparedModel) -> ModelArch:
    """The architecture, from the converted checkpoint when it exists, else from the HF config
    (the conversion writes the same record), so start-up rules run before any conversion."""
    if (model.megatron_dir / "metadata.json").exists():
        return read_arch(model.megatron_dir)
    try:
        return arch_from_hf_dir(model.hf_dir)
    except UnsupportedModelError as exc:
        raise ConfigError("actor_rollout_ref.model.path", str(exc)) from None


def ensure_converted(model: PreparedModel, log=print) -> PreparedModel:
    """Convert the HF model into ``model.megatron_dir`` on first use (published atomically)."""
    if not (model.megatron_dir / "metadata.json").exists():
        log(f"[setup] converting {model.hf_dir} to a Megatron checkpoint (once) -> {model.megatron_dir}")
        convert_hf_to_megatron(model.hf_dir, model.megatron_dir, force=model.megatron_dir.exists(), log=lambda *_: None)
    return model

