"""What to serve, given the path a user names: an HF model directory that an engine loads.

A path is, in this order of checks:

* a **run directory** (``checkpoints/latest`` inside): its newest complete checkpoint's actor;
* a **run checkpoint** (``trainer_state.json`` inside, e.g. ``RUN/checkpoints/step_00000004``): its actor;
* a **Megatron model** written by megatron_spin (``megatron_spin.json`` inside: a checkpoint's
  ``actor/``, a converted model, the offline trainer's ``--save-dir``);
* an **HF model directory** (``config.json`` inside), served as it is;
* a **packaged model** (``packaged:smollm2``).

Megatron weights are exported once to an HF directory (the converter table of the import, one
layer at a time) and the export is reused while its source is unchanged: a stamp in the export
records the source's path and the modification time of its ``metadata.json`` (Megatron writes it
last).  A run's exports go to ``RUN/exports/step_N``, others to a sibling ``NAME-hf``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

from megatron_spin import packaged
from megatron_spin.ckpt import run_state
from megatron_spin.ckpt.metadata import HF_SUBDIR, SPIN_METADATA, copy_identity
from megatron_spin.convert.pipeline import convert_megatron_to_hf
from megatron_spin.convert.prepare import locate_model
from megatron_spin.errors import ConfigError

EXPORT_STAMP = "megatron_spin_export.json"


class NotServable(ValueError):
    """The path names nothing an engine can load; the message says what was found and what is expected."""


@dataclasses.dataclass(frozen=True)
class Servable:
    hf_dir: Path  # what the engine loads
    name: str  # the served model name (OpenAI's ``model``): ``run/step_00000004``, or the directory's name
    source: str  # what the user named, resolved: for the banner


def resolve_servable(path: str, *, export_dir: Optional[str] = None, log: Callable[[str], None] = print) -> Servable:
    """The HF directory to serve for ``path`` (exported from Megatron weights when needed)."""
    if packaged.is_packaged(path):
        hf = packaged.model_dir(path)
        return Servable(hf, path.removeprefix(packaged.PREFIX), path)
    p = Path(path)
    if not p.exists():
        raise NotServable(f"{path}: no such file or directory")
    if (run_state.checkpoints_root(p) / "latest").exists():
        ckpt = run_state.latest(p)
        return _export(ckpt / run_state.ACTOR_SUBDIR, f"{p.resolve().name}/{ckpt.name}",
                       Path(export_dir) if export_dir else p / "exports" / ckpt.name, log)
    if (p / run_state.STATE_FILE).exists():
        run = p.resolve().parent.parent  # RUN/checkpoints/step_N
        return _export(p / run_state.ACTOR_SUBDIR, f"{run.name}/{p.name}",
                       Path(export_dir) if export_dir else run / "exports" / p.name, log)
    if (p / SPIN_METADATA).exists():
        return _export(p, p.resolve().name, Path(export_dir) if export_dir else p.parent / f"{p.name}-hf", log)
    if (p / "config.json").exists():
        return Servable(p, p.resolve().name, str(p))
    if run_state.checkpoints_root(p).exists():
        raise NotServable(f"{path}: a run directory without a complete checkpoint yet "
                          f"({run_state.checkpoints_root(p)}/latest is missing; set trainer.save_freq)")
    raise NotServable(f"{path}: not a run directory (checkpoints/latest), a run checkpoint ({run_state.STATE_FILE}), "
                      f"a megatron_spin model ({SPIN_METADATA}), an HF model directory (config.json) or "
                      f"one of {', '.join(packaged.PREFIX + m for m in packaged.MODELS)}")


def _export(megatron_dir: Path, name: str, out: Path, log: Callable[[str], None]) -> Servable:
    if not _has_identity(megatron_dir):
        _restore_identity(megatron_dir, log)
    if not _has_identity(megatron_dir):
        raise NotServable(f"{megatron_dir}: the weights carry no model identity ({SPIN_METADATA} and "
                          f"{HF_SUBDIR}/config.json), and the model its run started from is not there to copy them "
                          "from: copy both from the run's converted model (its actor_rollout_ref.model.megatron_dir, "
                          "or the cache) into it")
    stamp = _stamp(megatron_dir)
    if (out / EXPORT_STAMP).exists() and json.loads((out / EXPORT_STAMP).read_text()) == stamp:
        log(f"[serve] {out}: exported before from {megatron_dir}, unchanged since")
        return Servable(out, name, str(megatron_dir))
    convert_megatron_to_hf(megatron_dir, out, force=True, log=lambda m: log(f"[serve] {m}"))
    tmp = out / f".{EXPORT_STAMP}.tmp"
    tmp.write_text(json.dumps(stamp))
    os.replace(tmp, out / EXPORT_STAMP)  # last: an export without it is redone
    return Servable(out, name, str(megatron_dir))


def _has_identity(megatron_dir: Path) -> bool:
    return (megatron_dir / SPIN_METADATA).exists() and (megatron_dir / HF_SUBDIR / "config.json").exists()


def _restore_identity(actor_dir: Path, log: Callable[[str], None]) -> None:
    """A checkpoint saved before its ``actor/`` carried the model's identity: copy it from the
    converted model its run started from (the run's ``config.json`` names it), if that is still
    there.  Adds two small entries to the checkpoint; the weights are not touched."""
    run = actor_dir.resolve().parent.parent.parent  # RUN/checkpoints/step_N/actor
    if actor_dir.name != run_state.ACTOR_SUBDIR or not (run / "config.json").exists():
        return
    model = json.loads((run / "config.json").read_text()).get("actor_rollout_ref", {}).get("model", {})
    try:
        source = locate_model(str(model.get("path")), model.get("megatron_dir")).megatron_dir
    except (ConfigError, FileNotFoundError):
        return
    if _has_identity(source):
        log(f"[serve] {actor_dir}: saved without the model's identity; copying it from {source}")
        copy_identity(source, actor_dir)


def _stamp(megatron_dir: Path) -> dict:
    return {"source": str(megatron_dir.resolve()),
            "metadata_mtime_ns": (megatron_dir / "metadata.json").stat().st_mtime_ns}
