"""The embedded engine's weights: checked before they are touched, so a bad update changes nothing.

Every update — from tensors, from disk, from a broadcast — goes through :meth:`ModelWeights.check`
(names known, shapes equal, floating dtype, finite values) for the *whole* request before the
first copy.  A rejected request leaves every weight as it was.  An engine inside its owner's
process (transport ``shared``) takes the owner's tensors as its storage instead (:meth:`ModelWeights.share`),
after the same check.

After ``release`` (colocated mode: give the memory back while the actor trains) the weights are
gone; ``resume`` reallocates them and marks every tensor *unloaded*.  Generation is refused until
updates have covered all of them again, so a partial push after a resume cannot silently serve a
half-initialised model.

Names are the checkpoint's, as SGLang's ``load_weights`` takes them, also where the loaded model
holds a tensor differently: transformers (>= 5) fuses the experts of a Qwen3-MoE layer into two
3-D parameters, ``mlp.experts.gate_up_proj [E, 2I, H]`` (each expert's gate rows, then its up
rows) and ``mlp.experts.down_proj [E, H, I]``, while checkpoints — and so the trainer's push —
name every expert's projections (``mlp.experts.{e}.gate_proj.weight [I, H]``, ``up_proj``,
``down_proj``).  Each such name is a *view* into the fused parameter (:func:`checkpoint_views`);
a check, load, read or "not loaded since resume" is per view.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from megatron_spin.convert.hf_io import SAFETENSORS_DTYPES
from megatron_spin.wire.tensor_payload import PayloadError

_MAX_LISTED = 5
# Model types whose fused expert layout (above) was read from transformers' own checkpoint
# conversion ("mlp.experts.*.gate_proj/up_proj" stacked, then concatenated on dim 1).
_PER_EXPERT_CHECKPOINT = frozenset({"qwen3_moe"})
_Index = Optional[tuple]  # None: the whole parameter; else (expert, row slice) or (expert,)


def checkpoint_views(model_type: str, name: str, p: torch.Tensor) -> dict[str, tuple[str, _Index]]:
    """{checkpoint tensor name: (parameter name, index into it)} for parameter ``name``: itself,
    or one view per expert and projection of a fused MoE expert parameter."""
    if model_type in _PER_EXPERT_CHECKPOINT and p.dim() == 3:
        prefix, _, kind = name.rpartition(".")
        if prefix.endswith(".experts") and kind == "gate_up_proj":
            inter = p.shape[1] // 2
            return {f"{prefix}.{e}.{proj}.weight": (name, (e, rows))
                    for e in range(p.shape[0])
                    for proj, rows in (("gate_proj", slice(0, inter)), ("up_proj", slice(inter, 2 * inter)))}
        if prefix.endswith(".experts") and kind == "down_proj":
            return {f"{prefix}.{e}.down_proj.weight": (name, (e,)) for e in range(p.shape[0])}
    return {name: (name, None)}


class ModelWeights:
    def __init__(self, model: torch.nn.Module):
        self._params = dict(model.named_parameters())  # tied weights appear once
        self._param_shapes = {n: tuple(p.shape) for n, p in self._params.items()}
        model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
        self._views: dict[str, tuple[str, _Index]] = {}  # checkpoint name -> (parameter, index)
        for name, p in self._params.items():
            self._views.update(checkpoint_views(model_type, name, p))
        self._shapes = {n: tuple(self._view(n).shape) for n in self._views}
        self._dtypes = {n: self._params[pn].dtype for n, (pn, _) in self._views.items()}
        self.unloaded: set[str] = set()

    def _view(self, name: str) -> torch.Tensor:
        """The tensor checkpoint name ``name`` addresses, a view of the live parameter (taken
        afresh each time: ``release`` and ``resume`` replace the parameters' storage)."""
        param, index = self._views[name]
        p = self._params[param]
        return p if index is None or p.numel() == 0 else p[index]  # released: its empty storage

    @property
    def names(self) -> list[str]:
        return list(self._views)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def dtype(self, name: str) -> torch.dtype:
        return self._dtypes[name]

    def get(self, name: str) -> torch.Tensor:
        if name not in self._views:
            raise KeyError(name)
        return self._view(name)

    def check(self, named: Sequence[tuple[str, torch.Tensor]], *, complete: bool = False, where: str = "update") -> None:
        """Raise :class:`PayloadError` listing what is wrong with ``named`` (nothing is modified).

        Meta tensors (shapes read from file headers) are checked for name, shape and dtype only."""
        problems, seen = [], set()
        for name, t in named:
            if name not in self._views:
                problems.append(f"unknown tensor {name!r}")
            elif tuple(t.shape) != self._shapes[name]:
                problems.append(f"{name}: shape {tuple(t.shape)}, the model has {self._shapes[name]}")
            elif not t.dtype.is_floating_point:
                problems.append(f"{name}: dtype {t.dtype} is not floating point")
            elif not t.is_meta and not all_finite(t):
                problems.append(f"{name}: holds NaN or Inf")
            if name in seen:
                problems.append(f"{name}: sent twice")
            seen.add(name)
        if complete:
            missing = [n for n in self._views if n not in seen]
            if missing:
                problems.append(f"{len(missing)} of the model's tensors missing, e.g. {missing[:_MAX_LISTED]}")
        if problems:
            more = f" (and {len(problems) - _MAX_LISTED} more)" if len(problems) > _MAX_LISTED else ""
            raise PayloadError(f"{where} rejected, weights unchanged: " + "; ".join(problems[:_MAX_LISTED]) + more)

    @torch.no_grad()
    def load(self, named: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy checked tensors into the model; returns the number of bytes copied."""
        copied = 0
        for name, t in named:
            self._view(name).copy_(t)
            copied += t.numel() * t.element_size()
            self.unloaded.discard(name)
        return copied

    @torch.no_grad()
    def share(self, named: Iterable[tuple[str, torch.Tensor]]) -> tuple[int, int]:
        """Point the model at ``named`` (checked tensors of the process that owns them, e.g. the
        trainer's): a whole parameter given as a contiguous tensor of its dtype and device becomes
        that tensor's storage — no copy, and later in-place changes to it are the engine's weights
        too —; anything else is copied, into fresh storage for a whole parameter (the old storage
        may be the owner's: writing into it would change the owner's tensor).  Returns (bytes
        already in place, bytes updated): a tensor the engine reads already is in place; one
        re-bound to new storage or copied is an update (after an optimizer step, only what the
        converter built afresh, e.g. a split QKV)."""
        in_place = updated = 0
        for name, t in named:
            param, index = self._views[name]
            p = self._params[param]
            size = t.numel() * t.element_size()
            self.unloaded.discard(name)
            if index is None and t.is_contiguous() and t.dtype == p.dtype and t.device == p.device:
                if p.data_ptr() == t.data_ptr() and p.shape == t.shape:
                    in_place += size
                    continue
                p.data = t.detach()
            elif index is None:  # a copy of its own, in fresh storage: the old one may be the owner's memory
                p.data = t.detach().to(dtype=p.dtype, device=p.device, memory_format=torch.contiguous_format,
                                       copy=True)
            else:  # a view into a parameter only the engine holds (fused experts): never the owner's
                self._view(name).copy_(t)
            updated += size
        return in_place, updated

    def release(self) -> None:
        for p in self._params.values():
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self.unloaded = set(self._views)

    def resume(self) -> None:
        for name, p in self._params.items():
            if p.numel() == 0 and self._param_shapes[name] != (0,):
                p.data = torch.zeros(self._param_shapes[name], dtype=p.dtype, device=p.device)

    @property
    def released(self) -> bool:
        return any(p.numel() == 0 and self._param_shapes[n] != (0,) for n, p in self._params.items())


def all_finite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds no NaN or Inf, at the cost of one reduction (~half a memcpy).

    A NaN or an infinity makes the sum NaN or infinite, so a finite sum proves every element
    finite; only a non-finite sum (a bad element, or finite values whose sum overflows) pays for
    the exact element-wise test.  ``isfinite(t).all()`` alone materialises a mask and took five
    times a copy of the weights on every push."""
    return bool(torch.isfinite(t.sum(dtype=torch.float32))) or bool(torch.isfinite(t).all())


def read_safetensors_dir(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """(tensor name, file) for every tensor in an HF safetensors directory, validated for
    presence and readability; raises :class:`PayloadError` naming the path."""
    from safetensors import safe_open

    root = Path(path)
    if not root.is_dir():
        raise PayloadError(f"model_path {str(root)!r}: not a directory")
    index = root / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted({root / f for f in json.loads(index.read_text())["weight_map"].values()})
        except (ValueError, KeyError) as exc:
            raise PayloadError(f"{index}: unreadable index ({exc})") from None
    else:
        files = sorted(root.glob("*.safetensors"))
    if not files:
        raise PayloadError(f"model_path {str(root)!r}: no .safetensors files")
    out = []
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as handle:
                out += [(k, f) for k in handle.keys()]
        except Exception as exc:  # safetensors raises its own error types
            raise PayloadError(f"{f}: unreadable safetensors file ({exc})") from None
    return out


def load_safetensors_dir(weights: ModelWeights, path: str | os.PathLike) -> int:
    """Check the whole directory against the model, then load it; returns bytes copied."""
    from safetensors import safe_open

    located = read_safetensors_dir(path)
    by_file: dict[Path, list[str]] = {}
    for name, f in located:
        by_file.setdefault(f, []).append(name)
    # Shapes/dtypes from the headers first (cheap), values only while loading.
    headers = []
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            for n in names:
                sl = handle.get_slice(n)
                headers.append((n, torch.empty(sl.get_shape(), dtype=_st_dtype(sl.get_dtype()), device="meta")))
    weights.check(headers, complete=True, where=f"model_path {path}")
    # Values (finite) are checked for every file before the first copy, one file in memory at a
    # time, so a bad tensor in the last file cannot leave the first files loaded.
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            weights.check([(n, handle.get_tensor(n)) for n in names], where=f"{f}")
    copied = 0
    for f, names in by_file.items():
        with safe_open(str(f), framework="pt") as handle:
            copied += weights.load([(n, handle.get_tensor(n)) for n in names])
    return copied


def _st_dtype(name: str) -> torch.dtype:
    # An unknown dtype becomes uint8, which the floating-point check then refuses by name.
    return SAFETENSORS_DTYPES.get(name, torch.uint8)
