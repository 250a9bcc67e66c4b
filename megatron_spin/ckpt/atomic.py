"""Make a directory appear all at once: write into a hidden sibling, fsync, rename into place."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def tmp_sibling(out: Path, tag: str = "tmp") -> Path:
    return out.parent / f".{out.name}.{tag}-{uuid.uuid4().hex[:8]}"


def fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` (a rename is only durable after this)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def publish_dir(tmp: Path, out: Path, replace: bool) -> None:
    """Rename the complete ``tmp`` to ``out``; an existing ``out`` is replaced only if asked,
    and is restored if the swap fails half-way."""
    fsync_tree(tmp)
    if not out.exists():
        os.replace(tmp, out)
    elif not replace:
        shutil.rmtree(tmp, ignore_errors=True)
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    else:
        old = tmp_sibling(out, "old")
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)  # put the user's directory back
            raise
        shutil.rmtree(old, ignore_errors=True)
    fd = os.open(out.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
