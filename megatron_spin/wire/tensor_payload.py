"""``serialized_named_tensors``: how tensors travel in ``/update_weights_from_tensor``.

SGLang's wire format is a base64 string of a ``multiprocessing`` ForkingPickler dump: tensors
are not copied into the request, the pickle carries *handles* to their memory (CUDA IPC
handles on GPUs; shared-memory file names on the CPU), so the engine maps the sender's
buffer and copies straight into its weights.  That only works between processes on one host
— across hosts use the disk or distributed transport.

Two payload shapes, selected by ``load_format``:
  * ``None``: a list of ``(name, tensor)``;
  * ``"flattened_bucket"``: ``{"flattened_tensor": uint8 tensor, "metadata": [entry, ...]}``
    with SGLang's ``FlattenedTensorMetadata`` fields as ``SimpleNamespace``s (byte offsets;
    see :mod:`megatron_spin.wire.bucket`), which SGLang >= 0.5.10 and the embedded engine
    both read.

Pickle can run code, so the decoder is a restricted unpickler: it resolves only the torch
functions that rebuild shared tensors, torch dtypes and ``torch.Size``; anything else is a
:class:`PayloadError`.  Between CPU processes the sender must use torch's ``file_system``
sharing strategy (a file-descriptor handle cannot cross unrelated processes; the pickle's
authentication fails).
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import re
from typing import Any, Optional

import torch

from megatron_spin.wire.bucket import FlatEntry, NamedTensors, unflatten

FLATTENED_BUCKET = "flattened_bucket"
LOAD_FORMATS = (None, FLATTENED_BUCKET)


class PayloadError(ValueError):
    """A weight-update payload that cannot be decoded or does not fit the model."""


_TORCH_SHM_NAME = re.compile(rb"^/torch_\d+_\d+_\d+$")  # what torch's file_system strategy names
_TORCH_SHM_MANAGER = re.compile(rb"^/[\w./-]*/manager\.sock$")


def _checked_rebuild_storage_filename(cls, manager, handle, size, dtype=None):
    """torch's rebuild, only for segments torch itself created: a crafted handle naming some other
    ``/dev/shm`` object (another job's, Ray's) would otherwise be mapped, read and unlinked."""
    from torch.multiprocessing.reductions import rebuild_storage_filename

    if not (isinstance(handle, bytes) and _TORCH_SHM_NAME.match(handle)):
        raise PayloadError(f"serialized_named_tensors: refusing shared-memory handle {handle!r}")
    if not (isinstance(manager, bytes) and _TORCH_SHM_MANAGER.match(manager)):
        raise PayloadError(f"serialized_named_tensors: refusing shared-memory manager {manager!r}")
    if not isinstance(size, int) or size < 0:
        raise PayloadError(f"serialized_named_tensors: bad shared-memory size {size!r}")
    return rebuild_storage_filename(cls, manager, handle, size, dtype)


_ALLOWED_GLOBALS = {
    ("torch.multiprocessing.reductions", "rebuild_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_typed_storage"),
    ("torch.multiprocessing.reductions", "rebuild_storage_empty"),
    ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"),
    ("torch.multiprocessing.reductions", "rebuild_nested_tensor"),
    ("torch.storage", "UntypedStorage"),
    ("torch.storage", "TypedStorage"),
    ("torch", "Tensor"),
    ("torch", "Size"),
    ("torch.nn.parameter", "Parameter"),
    ("collections", "OrderedDict"),
    ("types", "SimpleNamespace"),  # flat-bucket metadata: an attribute bag, no behaviour
}


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_filename"):
            return _checked_rebuild_storage_filename
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise PayloadError(f"serialized_named_tensors: refusing to load {module}.{name} (only tensors are accepted)")


def use_file_system_sharing() -> None:
    """Make this process's CPU tensors shareable with unrelated processes (the sender side)."""
    import torch.multiprocessing as tmp

    if tmp.get_sharing_strategy() != "file_system":
        tmp.set_sharing_strategy("file_system")


def encode(payload: Any) -> str:
    """base64 ForkingPickler dump of ``payload`` (the sender keeps the tensors alive until the
    engine has replied: the engine reads the sender's memory)."""
    from multiprocessing.reduction import ForkingPickler

    devices = {t.device.type for t in _tensors_in(payload)}
    if "cpu" in devices:
        use_file_system_sharing()
    if "cuda" in devices:  # pragma: no cover - GPU tier
        _sglang_cuda_reductions()
    buf = io.BytesIO()
    ForkingPickler(buf).dump(payload)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _sglang_cuda_reductions() -> None:  # pragma: no cover - GPU tier, unverified
    """SGLang's engines rebuild CUDA IPC handles by device *UUID* (their process may see the GPUs
    renumbered by CUDA_VISIBLE_DEVICES); the sender must pickle with the same patched reducers."""
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        try:
            from sglang.srt.patch_torch import monkey_patch_torch_reductions
        except ImportError:
            return  # no SGLang here: same-numbering IPC (the embedded engine never sees CUDA)
    monkey_patch_torch_reductions()


def _tensors_in(payload: Any):
    if isinstance(payload, torch.Tensor):
        yield payload
    elif isinstance(payload, dict):
        for v in payload.values():
            yield from _tensors_in(v)
    elif isinstance(payload, (list, tuple)):
        for v in payload:
            yield from _tensors_in(v)


def encode_named_tensors(named: NamedTensors, load_format: Optional[str] = None, flat=None) -> str:
    """The payload for one engine TP rank.  For ``flattened_bucket`` pass ``flat=(buffer, entries)``."""
    if load_format is None:
        return encode([(n, t.detach()) for n, t in named])
    if load_format == FLATTENED_BUCKET:
        buffer, entries = flat
        return encode({"flattened_tensor": buffer, "metadata": [e.to_wire() for e in entries]})
    raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")


def decode_named_tensors(data: Any, load_format: Optional[str]) -> NamedTensors:
    """Inverse of :func:`encode_named_tensors`; every failure is a :class:`PayloadError`."""
    if load_format not in LOAD_FORMATS:
        raise PayloadError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    if not isinstance(data, str):
        raise PayloadError("serialized_named_tensors entries must be base64 strings")
    try:
        raw = base64.b64decode(data, validate=True)
        obj = _TensorUnpickler(io.BytesIO(raw)).load()
    except PayloadError:
        raise
    except (binascii.Error, pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            RuntimeError, OSError, IndexError, KeyError) as exc:
        raise PayloadError(f"serialized_named_tensors: cannot decode ({type(exc).__name__}: {exc})") from None
    if load_format == FLATTENED_BUCKET:
        if not isinstance(obj, dict) or not isinstance(obj.get("flattened_tensor"), torch.Tensor):
            raise PayloadError("flattened_bucket payload must be {'flattened_tensor': tensor, 'metadata': [...]}")
        try:
            entries = [FlatEntry.from_wire(e) for e in obj.get("metadata") or []]
            return unflatten(obj["flattened_tensor"], entries)
        except (ValueError, TypeError) as exc:
            raise PayloadError(f"flattened_bucket metadata: {exc}") from None
    if not isinstance(obj, (list, tuple)) or not all(
        isinstance(e, (list, tuple)) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], torch.Tensor)
        for e in obj
    ):
        raise PayloadError("serialized_named_tensors must decode to a list of (name, tensor) pairs")
    return [(n, t) for n, t in obj]
