"""The one place that knows CPU from CUDA and TransformerEngine from the local layer spec.

Everything else asks ``current()`` for a :class:`Platform` and uses its fields
(``device``, ``backend``, ``use_te``) instead of probing torch itself.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import warnings
from typing import TYPE_CHECKING, Callable, Mapping, TypeVar

# torch is imported where it is used: processes that only start others (Ray's engine hosts call
# cpu_worker_env) should not load it (~200 MB).
if TYPE_CHECKING:
    import torch

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Platform:
    """What this process can run on.

    device: torch device type tensors live on ("cuda" or "cpu").
    backend: torch.distributed backend for collectives ("nccl" or "gloo").
    has_te: TransformerEngine's PyTorch module imports *and* CUDA is present (TE needs both; a
        package that is installed but cannot load its libraries, e.g. cuDNN, does not count).
    has_fused_softmax: megatron's masked-softmax CUDA kernels import (they come with source
        builds of Megatron-LM / apex, not with the pip wheel of megatron-core).
    """

    device: str
    backend: str
    has_te: bool
    has_fused_softmax: bool = False

    @property
    def is_cuda(self) -> bool:
        return self.device == "cuda"

    def local_device(self) -> torch.device:
        """The device this process computes on (:func:`set_device` chose it)."""
        import torch

        return torch.device("cuda", torch.cuda.current_device()) if self.is_cuda else torch.device("cpu")

    def set_device(self, local_index: int = 0) -> None:
        """Bind this process to its GPU: ``local_index`` counts the GPUs it can see (Ray gives each
        trainer rank one, so 0; a local launch gives rank r the GPU r mod count).  No-op on the CPU."""
        if self.is_cuda:
            import torch

            torch.cuda.set_device(local_index % torch.cuda.device_count())

    def release_ipc_memory(self) -> None:
        """Give back device blocks shared over CUDA IPC that their receivers have let go of (torch
        keeps them until then), and the cached free blocks: after a push, before engines resume
        memory colocated with this process.  No-op on the CPU."""
        if self.is_cuda:
            import torch

            torch.cuda.ipc_collect()
            torch.cuda.empty_cache()

    def device_for_backend(self, backend: str) -> torch.device:
        """Where tensors of a collective on ``backend`` live: NCCL moves device memory, gloo host memory."""
        import torch

        return self.local_device() if backend == "nccl" else torch.device("cpu")


def _imports(module: str) -> bool:
    """True if ``module`` really imports (``find_spec`` would also accept a package whose CUDA
    libraries fail to load at import)."""
    try:
        importlib.import_module(module)
    except Exception:  # ImportError, OSError from a missing shared library, RuntimeError from a CUDA check
        return False
    return True


# glibc serves a request above its mmap threshold (at most 32 MiB by default) with a fresh mmap and
# returns it on free, so each step's large tensors (the full-vocabulary logits and their gradient,
# the embedding's dense gradient, ~100 MB each for a 135M model) are page-faulted in again: measured
# here, zeroing a fresh 113 MB tensor took 50 ms against 7 ms for a reused one.  Above both
# thresholds nothing the trainer allocates is mmapped or trimmed: freed memory is reused next step
# (the resident size stays at the step's peak between steps, which the peak already was).
# glibc's tunable -> the environment variable that sets it (its documented alias: one variable
# each, where GLIBC_TUNABLES would need a ':'-joined list, which Ray's runtime_env splits apart).
CPU_MALLOC_TUNABLES = {"glibc.malloc.mmap_threshold": ("MALLOC_MMAP_THRESHOLD_", str(1 << 32)),
                       "glibc.malloc.trim_threshold": ("MALLOC_TRIM_THRESHOLD_", str(1 << 34))}


def cpu_worker_env(environ: Mapping[str, str]) -> dict[str, str]:
    """Environment for a process that computes on the CPU (trainer rank, embedded engine), set
    before it starts: glibc's allocator keeps freed large blocks for reuse (``CPU_MALLOC_TUNABLES``),
    except a setting ``environ`` already makes (its variable, or ``GLIBC_TUNABLES`` naming the
    tunable: the user's choice wins).  GPU processes allocate their tensors through CUDA's caching
    allocator and get nothing."""
    named = {item.split("=", 1)[0] for item in environ.get("GLIBC_TUNABLES", "").split(":") if item}
    return {var: value for tunable, (var, value) in CPU_MALLOC_TUNABLES.items()
            if tunable not in named and var not in environ}


def on_a_passing_thread(fn: Callable[[], T]) -> T:
    """``fn()`` on a thread that ends when it returns (its result, or what it raised).

    On the CPU every thread that computes in parallel keeps an OpenMP pool until it ends, and
    GNU OpenMP cuts every pool's spin-waiting to ~100 spins once the process holds more OpenMP
    threads than cores: each parallel region then wakes its threads through the kernel (the
    embedded engine decoded ~35 % slower, training ~10 %).  Work that must not leave a pool
    behind — a trainer rank's set-up when its engine thread does the rest — runs here."""
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="passing") as pool:
        return pool.submit(fn).result()  # leaving the block joins the thread


def prepare_inference_model(model: torch.nn.Module) -> None:
    """Tune an HF model that serves generation (the embedded engine): on the CPU its plain linear
    layers multiply weight-first (:mod:`megatron_spin.platform.cpu_linear`: ~25% faster decoding
    on MKL); a model on a GPU is left as it is."""
    from megatron_spin.platform import cpu_linear

    first = next(model.parameters(), None)
    if first is not None and first.device.type == "cpu":
        cpu_linear.orient_linears(model)


@functools.lru_cache(maxsize=1)
def current() -> Platform:
    """Detect the platform once per process."""
    import torch

    if torch.cuda.is_available():
        return Platform(device="cuda", backend="nccl", has_te=_imports("transformer_engine.pytorch"),
                        has_fused_softmax=all(_imports(m) for m in ("scaled_masked_softmax_cuda",
                                                                     "scaled_upper_triang_masked_softmax_cuda")))
    return Platform(device="cpu", backend="gloo", has_te=False)


def prepare_megatron() -> Platform:
    """Make megatron-core usable on this platform and return it.

    With CUDA nothing is patched.  Without it the targeted CPU patches in
    :mod:`megatron_spin.platform.cpu_patches` are applied (idempotent).
    """
    plat = current()
    # Deprecation notices from torch's DCP / ShardedTensor APIs that megatron-core 0.16 uses
    # internally: nothing a megatron_spin user can change.
    for pattern in (".*Please use DTensor instead.*", ".*`load_state_dict` is deprecated.*",
                    ".*all_gather_into_tensor` is deprecated.*"):
        warnings.filterwarnings("ignore", message=pattern)
    if not plat.is_cuda:
        warnings.filterwarnings("ignore", message=".*CUDA_DEVICE_MAX_CONNECTIONS.*")
        # Megatron warns at import time about every fused kernel it cannot find; on a CPU
        # build that is expected and says nothing the user can act on.
        for pattern in (".*Apex is not installed.*", ".*Transformer Engine and Apex are not installed.*",
                        ".*Transformer Engine is not installed.*", ".*full scope is deprecated.*"):
            warnings.filterwarnings("ignore", message=pattern)

        from megatron_spin.platform import cpu_patches

        cpu_patches.apply()
    _define_missing_te_gemm()
    return plat


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16's MoE router calls ``te_general_gemm`` when it is not None, but defines the
    name only when TransformerEngine imports: without TE every MoE forward dies with a NameError.
    Defining it as None gives the router its own torch matmul, on CPU and on a GPU without TE."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
