"""Resolve the model a run starts from: an HF directory for the engines, a Megatron checkpoint for the trainer.

``path: embedded`` materialises SmolLM2-135M-Instruct from its package.  Without an explicit
``megatron_dir`` the HF model is converted once into the cache, under a name derived from the
HF directory's path and config, and reused by later runs.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional

from megatron_spin.models.embedded import DEFAULT_EMBEDDED_DIR, materialize_embedded_model


def cache_root() -> Path:
    return Path(os.environ.get("MEGATRON_SPIN_CACHE") or "~/.cache/megatron_spin").expanduser()


def prepare_model(path: str, megatron_dir: Optional[str] = None, log=print) -> tuple[Path, Path]:
    from megatron_spin.convert.pipeline import convert_hf_to_megatron

    if path == "embedded":
        hf = materialize_embedded_model(DEFAULT_EMBEDDED_DIR)
    else:
        hf = Path(path)
        if not (hf / "config.json").exists():
            raise FileNotFoundError(f"actor_rollout_ref.model.path={path}: no config.json (an HF model directory "
                                    "or 'embedded')")
    if megatron_dir:
        out = Path(megatron_dir)
        if not (out / "metadata.json").exists():
            raise FileNotFoundError(f"actor_rollout_ref.model.megatron_dir={megatron_dir}: not a Megatron "
                                    "checkpoint (convert with tools/convert_hf_to_megatron.py, or leave it unset)")
        return hf, out
    key = hashlib.sha256(f"{hf.resolve()}:{(hf / 'config.json').read_text()}".encode()).hexdigest()[:12]
    out = cache_root() / "megatron" / f"{hf.name}-{key}"
    if not (out / "metadata.json").exists():
        log(f"[setup] converting {hf} to a Megatron checkpoint (once) -> {out}")
        convert_hf_to_megatron(hf, out, force=out.exists(), log=lambda *_: None)
    return hf, out
