"""Targeted patches that let megatron-core 0.16 run on a CPU-only torch build with gloo.

Megatron-core assumes CUDA in a handful of ways (DESIGN.md, "Facts about the platform"):
  1. it calls ``torch.cuda.current_device()`` / ``torch.cuda.synchronize()`` (RoPE, p2p,
     schedules, tensor-parallel buffers, the checkpoint writer);
  2. it creates tensors with a literal ``device="cuda"`` (causal mask, schedules, optimizer);
  3. its model-parallel RNG tracker stores CUDA generator states;
  4. optimizers and grad clipping check ``tensor.type()`` strings for ``torch.cuda.*Tensor``;
  5. tied embeddings under PP move the output weight with ``tensor.cuda()``;
  6. its checkpoint writer starts a *spawn*-context ``multiprocessing`` Manager (a fresh
     interpreter, ~2.3 s on 2 cores) on a process's first save, for a queue that, in the
     synchronous saves megatron_spin makes, passes one result back into the same process.
     Spawn guards CUDA state a fork would copy; without CUDA a fork-context Manager gives the
     same kind of queue in ~20 ms.
  7. its MoE all-to-all token dispatcher copies the per-rank split sizes "to the host" on a side
     CUDA stream and hands them to ``all_to_all_single`` as numpy arrays; the copy helper only
     converts device tensors, so on the CPU the splits stay tensors, which the collective refuses.
     The streams are answered by a host stream (``_HostStream``) and the helper converts host
     tensors the way it converts device ones.

Rather than editing call sites, each megatron module that references the global ``torch`` is
given a *view* of torch (``_CpuTorchView``) whose ``cuda`` namespace answers with CPU
semantics and whose tensor factories map ``device="cuda"`` to the CPU.  torch itself is left
untouched, so transformers, Ray and user code see an ordinary CPU build.  The RNG tracker is
pointed at the CPU generator.  The few methods that call ``tensor.cuda()`` or compare
``tensor.type()`` strings run inside a context that gives those answers a CUDA build would
give, for the duration of the call only.  Nothing here is applied when CUDA is present.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import multiprocessing
import sys
import types
from typing import Any

import torch

# Megatron modules on the paths megatron_spin uses (model build, forward/backward, TP/PP
# communication, optimizers, dist checkpointing).  Importing them here makes the patch
# independent of import order elsewhere.
_MEGATRON_MODULES = (
    "megatron.core.utils",
    "megatron.core.parallel_state",
    "megatron.core.transformer.utils",
    "megatron.core.transformer.attention",
    "megatron.core.transformer.dot_product_attention",
    "megatron.core.transformer.transformer_block",
    "megatron.core.transformer.transformer_layer",
    "megatron.core.transformer.module",
    "megatron.core.fusions.fused_softmax",
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    "megatron.core.models.common.embeddings.language_model_embedding",
    "megatron.core.models.common.language_module.language_module",
    "megatron.core.models.gpt.gpt_model",
    "megatron.core.tensor_parallel.layers",
    "megatron.core.tensor_parallel.mappings",
    "megatron.core.tensor_parallel.cross_entropy",
    "megatron.core.tensor_parallel.data",
    "megatron.core.tensor_parallel.random",
    "megatron.core.tensor_parallel.utils",
    "megatron.core.pipeline_parallel.p2p_communication",
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel.utils",
    "megatron.core.distributed.distributed_data_parallel",
    "megatron.core.distributed.param_and_grad_buffer",
    "megatron.core.distributed.finalize_model_grads",
    "megatron.core.optimizer",
    "megatron.core.optimizer.optimizer",
    "megatron.core.optimizer.distrib_optimizer",
    "megatron.core.optimizer.clip_grads",
    "megatron.core.optimizer.grad_scaler",
    "megatron.core.optimizer_param_scheduler",
    "megatron.core.dist_checkpointing.serialization",
    "megatron.core.dist_checkpointing.exchange_utils",
    "megatron.core.dist_checkpointing.tensor_aware_state_dict",
    "megatron.core.dist_checkpointing.strategies.torch",
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
    "megatron.core.dist_checkpointing.strategies.fully_parallel",
    "megatron.core.dist_checkpointing.strategies.async_utils",
    "megatron.core.transformer.moe.router",
    "megatron.core.transformer.moe.experts",
    "megatron.core.transformer.moe.moe_layer",
    "megatron.core.transformer.moe.moe_utils",
    "megatron.core.transformer.moe.token_dispatcher",
)

_FACTORIES = (
    "zeros", "ones", "empty", "full", "tensor", "arange", "rand", "randn", "randint",
    "zeros_like", "ones_like", "empty_like", "full_like",
)


def _is_cuda(device: Any) -> bool:
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


def _cpu_device(device: Any) -> Any:
    return "cpu" if _is_cuda(device) else device


class _CudaOnCpu(types.SimpleNamespace):
    """What megatron asks of ``torch.cuda``, answered for a CPU process."""

    def __getattr__(self, name: str) -> Any:  # everything else: the real (CPU-build) torch.cuda
        return getattr(torch.cuda, name)

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def synchronize(*_args, **_kwargs) -> None:
        return None

    @staticmethod
    def get_rng_state(*_args, **_kwargs) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
        torch.set_rng_state(state)

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def set_device(*_args, **_kwargs) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def memory_allocated(*_args, **_kwargs) -> int:
        return 0

    @staticmethod
    def max_memory_allocated(*_args, **_kwargs) -> int:
        return 0

    # The MoE all-to-all dispatcher copies its split sizes to the host on a side stream and
    # waits on an event; a CPU process has one implicit stream on which every op is complete.
    @staticmethod
    def Stream(*_args, **_kwargs) -> "_HostStream":  # noqa: N802 (torch's name)
        return _HOST_STREAM

    @staticmethod
    def current_stream(*_args, **_kwargs) -> "_HostStream":
        return _HOST_STREAM

    @staticmethod
    def stream(*_args, **_kwargs):
        return contextlib.nullcontext()


class _HostEvent:
    """An event on the host stream: already complete when recorded."""

    def synchronize(self) -> None:
        return None

    def wait(self, *_args) -> None:
        return None

    def query(self) -> bool:
        return True


class _HostStream:
    """The one stream a CPU process has: ops complete in program order."""

    def wait_stream(self, _other) -> None:
        return None

    def wait_event(self, _event) -> None:
        return None

    def record_event(self, *_args) -> _HostEvent:
        return _HostEvent()

    def synchronize(self) -> None:
        return None


_HOST_STREAM = _HostStream()


class _CpuTorchView(types.ModuleType):
    """``torch`` as megatron modules see it on a CPU-only build (see module docstring)."""

    def __init__(self) -> None:
        super().__init__("torch")
        self.cuda = _CudaOnCpu()
        for name in _FACTORIES:
            setattr(self, name, self._redirect(getattr(torch, name)))

    def __getattr__(self, name: str) -> Any:
        value = getattr(torch, name)
        setattr(self, name, value)  # cache: megatron looks torch attributes up on hot paths
        return value

    @staticmethod
    def _redirect(factory):
        def call(*args, **kwargs):
            if "device" in kwargs:
                kwargs["device"] = _cpu_device(kwargs["device"])
            return factory(*args, **kwargs)

        call.__name__ = factory.__name__
        call.__doc__ = factory.__doc__
        return call


def _patch_rng(random_mod: types.ModuleType) -> None:
    # The tracker keeps per-name generator states and forks them around dropout/init; on CPU
    # the only generator is the default CPU one, so both state hooks target it.
    random_mod._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    random_mod._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


@contextlib.contextmanager
def _tensor_cuda_is_identity():
    """Inside: ``tensor.cuda()`` returns the tensor (it would raise on a CPU-only build)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *a, **k: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


@contextlib.contextmanager
def _tensor_types_named_as_cuda():
    """Inside: ``tensor.type()`` of a CPU tensor answers ``torch.cuda.FloatTensor`` etc."""
    original = torch.Tensor.type

    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs and self.device.type == "cpu":
            return original(self).replace("torch.", "torch.cuda.", 1)
        return original(self, dtype, non_blocking, **kwargs)

    torch.Tensor.type = type_
    try:
        yield
    finally:
        torch.Tensor.type = original


def _run_inside(context, owner: Any, name: str) -> None:
    """Replace ``owner.name`` by a wrapper that runs the original inside ``context()``."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        with context():
            return original(*args, **kwargs)

    setattr(owner, name, wrapper)


def _patch_methods() -> None:
    modules = sys.modules
    # Tied embeddings under PP: the last stage's copy of the embedding is synced from the first
    # stage by ``weight.data = weight.data.cuda(); all_reduce(...)`` in this one method.
    _run_inside(_tensor_cuda_is_identity,
                modules["megatron.core.models.common.language_module.language_module"].LanguageModule,
                "setup_embeddings_and_output_layer")
    # Optimizers and grad clipping decide what to do with a parameter from its type() string
    # and reject anything that is not a torch.cuda.*Tensor.
    optimizer_mod = modules["megatron.core.optimizer.optimizer"]
    clip_mod = modules["megatron.core.optimizer.clip_grads"]
    _run_inside(_tensor_types_named_as_cuda, clip_mod, "clip_grad_by_total_norm_fp32")
    optimizer_mod.clip_grad_by_total_norm_fp32 = clip_mod.clip_grad_by_total_norm_fp32  # from-imported there
    _run_inside(_tensor_types_named_as_cuda, optimizer_mod.Float16OptimizerWithFloat16Params, "__init__")
    _run_inside(_tensor_types_named_as_cuda,
                modules["megatron.core.optimizer.distrib_optimizer"].DistributedOptimizer, "__init__")


def _patch_moe_host_copies(moe_utils: types.ModuleType, dispatcher: types.ModuleType) -> None:
    """Item 7: split sizes become numpy arrays as on a GPU (the tensors already live on the host)."""

    def maybe_move_tensor_to_cpu(tensor, as_numpy: bool = False, record_stream: bool = False):
        if torch.is_tensor(tensor) and as_numpy:
            return tensor.numpy()
        return tensor

    moe_utils.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu
    dispatcher.maybe_move_tensor_to_cpu = maybe_move_tensor_to_cpu  # from-imported there


def _patch_writer_results_queue(fs_async: types.ModuleType) -> None:
    """Item 6: the writer's results queue from a fork-context Manager (created once per process,
    as megatron does; its server is a child forked from the rank, so it dies with it: see
    :mod:`megatron_spin.lifetime`)."""

    def get_write_results_queue():
        if fs_async._results_queue is None:
            fs_async._results_queue = multiprocessing.get_context("fork").Manager().Queue()
        return fs_async._results_queue

    fs_async._get_write_results_queue = get_write_results_queue


_APPLIED = False
# The releases these patches were written against (module list, method names, the RNG tracker's
# private hooks).  Another release may have moved any of them: refuse it rather than half-patch.
SUPPORTED_MEGATRON = ("0.16.",)


class UnsupportedMegatronError(RuntimeError):
    pass


def check_megatron_version(version: str | None = None) -> str:
    """The installed megatron-core version, or :class:`UnsupportedMegatronError` naming the fix."""
    if version is None:
        try:
            version = importlib.metadata.version("megatron-core")
        except importlib.metadata.PackageNotFoundError:
            raise UnsupportedMegatronError("megatron-core is not installed; CPU runs need megatron-core==0.16.1 "
                                           "(bash tools/setup_venv.sh installs it)") from None
    if not version.startswith(SUPPORTED_MEGATRON):
        raise UnsupportedMegatronError(
            f"megatron-core {version} is installed, but megatron_spin's CPU support (platform/cpu_patches.py) is "
            f"written for {' / '.join(v + 'x' for v in SUPPORTED_MEGATRON)}; install megatron-core==0.16.1 for CPU "
            "runs (on GPUs nothing is patched and any tested release works)")
    return version


def apply() -> None:
    """Apply every CPU patch once per process.  Idempotent.  Refuses a megatron-core release the
    patches were not written for, and one that lacks a module they patch."""
    global _APPLIED
    if _APPLIED:
        return
    version = check_megatron_version()
    view = _CpuTorchView()
    for name in _MEGATRON_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError as exc:
            raise UnsupportedMegatronError(f"megatron-core {version}: {name} does not import ({exc}); the CPU "
                                           "patches need it") from None
        if getattr(mod, "torch", None) is torch:
            mod.torch = view
    _patch_rng(sys.modules["megatron.core.tensor_parallel.random"])
    _patch_methods()
    _patch_writer_results_queue(sys.modules["megatron.core.dist_checkpointing.strategies.filesystem_async"])
    _patch_moe_host_copies(sys.modules["megatron.core.transformer.moe.moe_utils"],
                           sys.modules["megatron.core.transformer.moe.token_dispatcher"])
    _APPLIED = True
