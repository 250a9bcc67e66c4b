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
from megatron_spin.convert.pipeline import convert_hf_to_megatron


@dataclasses.dataclass(frozen=True)
class PreparedModel:
    hf_dir: Path  # what the engines load (config, tokenizer, weights)
    megatron_dir: Path  # what the trainer ranks load (a Megatron dist checkpoint)


def prepare_model(path: str, megatron_dir: Optional[str] = None, log=print) -> PreparedModel:
    """``path``: an HF model directory or a packaged model name; ``megatron_dir``: a converted
    checkpoint (default: converted into the cache on first use)."""
    where = "actor_rollout_ref.model"
    if packaged.is_packaged(path):
        hf = packaged.model_dir(path)
    else:
        hf = Path(path)
        if not (hf / "config.json").exists():
            raise FileNotFoundError(f"{where}.path={path}: no config.json (an HF model directory, or one of "
                                    f"{', '.join(packaged.PREFIX + m for m in packaged.MODELS)})")
    if megatron_dir:
        out = Path(megatron_dir)
        if not (out / "metadata.json").exists():
            raise FileNotFoundError(f"{where}.megatron_dir={megatron_dir}: not a Megatron checkpoint (convert "
                                    "with tools/convert_hf_to_megatron.py, or leave it unset)")
        return PreparedModel(hf, out)
    key = hashlib.sha256(f"{hf.resolve()}:{(hf / 'config.json').read_text()}".encode()).hexdigest()[:12]
    out = cache_root() / "megatron" / f"{hf.name}-{key}"
    if not (out / "metadata.json").exists():
        log(f"[setup] converting {hf} to a Megatron checkpoint (once) -> {out}")
        convert_hf_to_megatron(hf, out, force=out.exists(), log=lambda *_: None)
    return PreparedModel(hf, out)
