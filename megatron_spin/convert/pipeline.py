"""HF directory ↔ Megatron dist checkpoint, end to end (what the two conversion tools run).

Both directions stream through the converter table one tensor (or one layer) at a time and
make the output directory appear atomically: everything is written into a hidden temporary
sibling that is renamed into place only when complete, so a crash never leaves a directory
that looks like a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

from megatron_spin.ckpt.atomic import publish_dir, tmp_sibling
from megatron_spin.ckpt.metadata import HF_SUBDIR, SPIN_METADATA, read_arch
from megatron_spin.ckpt.safe_load import read_dcp_metadata
from megatron_spin.convert import converter_for, streaming
from megatron_spin.convert.hf_io import HFCheckpointError, HFReader, HFShardedWriter, copy_side_files
from megatron_spin.parallel.groups import init_parallel
from megatron_spin.parallel.launch import launch
from megatron_spin.parallel.layout import ParallelLayout, validate_layout
from megatron_spin.spec.arch import arch_from_hf_dir
from megatron_spin.spec.precision import torch_dtypes

Progress = Callable[[str], None]

_DTYPE_NAMES = torch_dtypes()


def _hf_to_megatron_rank(rank, world_size, hf_dir, tmp, dtype_name, report_every):
    arch = arch_from_hf_dir(hf_dir)
    reader = HFReader(hf_dir)
    table = converter_for(arch)
    pctx = init_parallel(ParallelLayout())
    started = time.monotonic()

    def progress(done, total, key):
        if done == total or done % report_every == 0:
            print(f"  [{done}/{total}] {key} ({time.monotonic() - started:.1f} s)", flush=True)

    n = streaming.write_megatron_checkpoint(
        arch, pctx, tmp, reader.get, reader.dtype,
        dtype=_DTYPE_NAMES[dtype_name] if dtype_name else None,
        extra_metadata={"hf_dtypes": {h: str(reader.dtype(h)).removeprefix("torch.") for h in table.hf_names(arch)}},
        progress=progress,
    )
    return n


def convert_hf_to_megatron(
    hf_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    layout: Optional[ParallelLayout] = None,
    dtype: Optional[str] = None,
    force: bool = False,
    timeout: float = 24 * 3600,
    log: Progress = print,
) -> dict:
    """Convert an HF safetensors model to a Megatron dist checkpoint; returns a summary.

    ``layout`` is checked against the model before any work (the checkpoint itself loads at
    every valid layout).  ``dtype`` casts stored weights (default: keep HF dtypes).
    """
    hf_dir, out = Path(hf_dir), Path(out_dir)
    arch = arch_from_hf_dir(hf_dir)
    if layout is not None:
        validate_layout(arch, layout)
    if dtype is not None and dtype not in _DTYPE_NAMES:
        raise ValueError(f"--dtype {dtype!r} is not one of {tuple(_DTYPE_NAMES)}")
    reader = HFReader(hf_dir)
    missing = [n for n in converter_for(arch).hf_names(arch) if n not in reader]
    if missing:
        raise HFCheckpointError(f"{hf_dir}: {len(missing)} tensors missing, e.g. {missing[:3]}")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out)
    started = time.monotonic()
    log(f"converting {hf_dir} ({arch.hf_architecture}, {arch.num_layers} layers) -> {out}")
    try:
        report_every = max(1, arch.num_layers)
        (chunks,) = launch(_hf_to_megatron_rank, 1, (str(hf_dir), str(tmp), dtype, report_every), timeout=timeout)
        copy_side_files(hf_dir, tmp / HF_SUBDIR)
        publish_dir(tmp, out, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    log(f"wrote {chunks} chunks to {out} in {seconds:.1f} s")
    return {"chunks": chunks, "seconds": seconds, "out": str(out)}


def _megatron_to_hf_rank(rank, world_size, megatron_dir, tmp, max_shard_bytes):
    arch = read_arch(megatron_dir)
    meta = json.loads((Path(megatron_dir) / SPIN_METADATA).read_text())
    hf_dtypes = {k: _DTYPE_NAMES[v] for k, v in meta.get("hf_dtypes", {}).items()}
    pctx = init_parallel(ParallelLayout())
    table = converter_for(arch)
    writer = HFShardedWriter(tmp, max_shard_bytes=max_shard_bytes)
    count = 0
    for param, tensor in streaming.iter_megatron_checkpoint(arch, pctx, megatron_dir):
        for name, t in table.to_hf(arch, param, tensor).items():
            writer.add(name, t.to(hf_dtypes.get(name, t.dtype)))
            count += 1
    writer.close()
    return count


def convert_megatron_to_hf(
    megatron_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    max_shard_bytes: int = 2 * 1024**3,
    force: bool = False,
    timeout: float = 24 * 3600,
    log: Progress = print,
) -> dict:
    """Export a Megatron dist checkpoint (written by megatron_spin) as an HF model directory."""
    src, out = Path(megatron_dir), Path(out_dir)
    arch = read_arch(src)
    read_dcp_metadata(src)  # refuse a crafted index here, with its name, before a rank starts
    side = src / HF_SUBDIR
    if not (side / "config.json").exists():
        raise FileNotFoundError(f"{side}/config.json: missing; cannot write an HF config for this checkpoint")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_sibling(out)
    started = time.monotonic()
    log(f"exporting {src} ({arch.hf_architecture}) -> {out}")
    try:
        (count,) = launch(_megatron_to_hf_rank, 1, (str(src), str(tmp), max_shard_bytes), timeout=timeout)
        copy_side_files(side, tmp)
        publish_dir(tmp, out, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.monotonic() - started
    log(f"wrote {count} tensors to {out} in {seconds:.1f} s")
    return {"tensors": count, "seconds": seconds, "out": str(out)}
