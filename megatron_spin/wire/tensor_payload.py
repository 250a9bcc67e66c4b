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

Devices: a CUDA handle names its GPU by the device's **UUID**, not its index (SGLang's
convention: the engine may see the GPUs numbered differently under its own
``CUDA_VISIBLE_DEVICES``).  The sender writes the UUID itself (no SGLang needed in the trainer);
the pickle still names torch's ``rebuild_cuda_tensor``, which an SGLang engine has patched to
read UUIDs and the embedded engine's decoder resolves here.  A flattened bucket also carries
the sender's device id (``megatron_spin_device``; SGLang ignores the key), which the embedded
engine checks against the devices it holds when it simulates them on the CPU.
"""

from __future__ import annotations

import base64
import binascii
import io
import pickle
import re
from multiprocessing.reduction import ForkingPickler
from typing import Any, Optional

import torch
from torch.multiprocessing import reductions

from megatron_spin.wire.bucket import FlatEntry, NamedTensors, unflatten
from megatron_spin.wire.formats import FLATTENED_BUCKET, LOAD_FORMATS

DEVICE_KEY = "megatron_spin_device"  # a flattened bucket's sender device (ignored by SGLang)
_CUDA_DEVICE_ARG = 6  # rebuild_cuda_tensor(tensor_cls, size, stride, offset, storage_cls, dtype, device, ...)


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


def _rebuild_cuda_tensor_by_uuid(*args):
    """torch's rebuild, with the device named by UUID (or index) mapped onto this process's GPUs;
    a GPU this process cannot see is a :class:`PayloadError`, not a crash."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    device = args[_CUDA_DEVICE_ARG]
    if isinstance(device, str):
        visible = {str(torch.cuda.get_device_properties(i).uuid): i for i in range(torch.cuda.device_count())}
        if device not in visible:
            raise PayloadError(f"serialized_named_tensors: a CUDA handle from GPU {device}, which this engine "
                               f"cannot see (it sees {sorted(visible) or 'no GPU'})")
        args = args[:_CUDA_DEVICE_ARG] + (visible[device],) + args[_CUDA_DEVICE_ARG + 1:]
    return rebuild_cuda_tensor(*args)


class _TensorUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_storage_filename"):
            return _checked_rebuild_storage_filename
        if (module, name) == ("torch.multiprocessing.reductions", "rebuild_cuda_tensor"):
            return _rebuild_cuda_tensor_by_uuid
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise PayloadError(f"serialized_named_tensors: refusing to load {module}.{name} (only tensors are accepted)")


def use_file_system_sharing() -> None:
    """Make this process's CPU tensors shareable with unrelated processes (the sender side)."""
    import torch.multiprocessing as tmp

    if tmp.get_sharing_strategy() != "file_system":
        tmp.set_sharing_strategy("file_system")


def _cuda_device_uuid(device) -> str:
    return device if isinstance(device, str) else str(torch.cuda.get_device_properties(device).uuid)


class _Pickler(ForkingPickler):
    """ForkingPickler whose CUDA tensors name their GPU by UUID (see the module docstring)."""

    def reducer_override(self, obj):
        if isinstance(obj, torch.Tensor) and obj.is_cuda:
            fn, args = reductions.reduce_tensor(obj)
            return fn, args[:_CUDA_DEVICE_ARG] + (_cuda_device_uuid(args[_CUDA_DEVICE_ARG]),) + \
                args[_CUDA_DEVICE_ARG + 1:]
        return NotImplemented


def encode(payload: Any) -> str:
    """base64 pickle of ``payload`` (the sender keeps the tensors alive until the engine has
    replied: the engine reads the sender's memory)."""
    if any(t.device.type == "cpu" for t in _tensors_in(payload)):
        use_file_system_sharing()
    buf = io.BytesIO()
    _Pickler(buf).dump(payload)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tensors_in(payload: Any):
    if isinstance(payload, torch.Tensor):
        yield payload
    elif isinstance(payload, dict):
        for v in payload.values():
            yield from _tensors_in(v)
    elif isinstance(payload, (list, tuple)):
        for v in payload:
            yield from _tensors_in(v)


def encode_named_tensors(named: NamedTensors, load_format: Optional[str] = None, flat=None,
                         device: Optional[str] = None) -> str:
    """The payload for one engine TP rank.  For ``flattened_bucket`` pass ``flat=(buffer, entries)``;
    ``device``: the sender's device id, carried by a flattened bucket."""
    if load_format is None:
        return encode([(n, t.detach()) for n, t in named])
    if load_format == FLATTENED_BUCKET:
        buffer, entries = flat
        payload = {"flattened_tensor": buffer, "metadata": [e.to_wire() for e in entries]}
        if device is not None:
            payload[DEVICE_KEY] = device
        return encode(payload)
    raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")


def decode_named_tensors(data: Any, load_format: Optional[str],
                         held_devices: Optional[frozenset[str]] = None) -> NamedTensors:
    """Inverse of :func:`encode_named_tensors`; every failure is a :class:`PayloadError`.
    ``held_devices``: the (simulated) devices this receiver holds; a flattened bucket from any
    other device is refused, as SGLang refuses a handle from a GPU it cannot see."""
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
        if held_devices is not None and obj.get(DEVICE_KEY) not in held_devices:
            raise PayloadError(f"serialized_named_tensors: a bucket from device {obj.get(DEVICE_KEY)!r}, which this "
                               f"engine rank does not hold (it holds {sorted(held_devices)})")
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
