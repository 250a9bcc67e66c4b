"""The embedded engine: an HF causal LM on the CPU behind SGLang's engine operations.

    engine = EmbeddedEngine.load("/path/to/hf_model")
    replies = engine.generate(GenerateRequest(...))     # [prompt][sample] Completions
    pending = engine.submit(request); ...; replies = engine.replies(pending)   # the server's way

What it does, operation by operation (the HTTP layer in ``server.py`` only maps routes here):
  * generate: the request is checked first (token ids inside the vocabulary, prompt plus
    ``max_new_tokens`` inside the context, at most ``max_samples_per_request`` samples): a bad
    request is a :class:`ProtocolError` (HTTP 400) and never reaches a batch, where it would
    fail the other requests too.  Each prompt is expanded into ``n`` jobs; concurrent requests
    are batched by :class:`BatchingWorker`; every completion carries the ``weight_version`` of
    its batch.  A caller that gives up cancels its :class:`PendingGeneration` (the server does
    when the client's connection closes): its rows stop at the next decode step.  Stop strings
    are matched on text decoded with the model's tokenizer (a request with stop strings to a
    model without one is refused); a ``listener`` hears every token as it is chosen (streaming).
  * weight updates (tensor, disk, distributed): the whole request is checked first
    (:class:`ModelWeights`), then copied in while no batch runs; ``weight_version`` is set
    only after a successful load.  A failed update raises :class:`PayloadError`.  As in SGLang
    (>= 0.5.21), tensor and distributed updates run only inside a weight-update session
    (``begin``/``end``), and a second ``begin`` is refused.
  * pause/continue generation, release/resume memory by tag (``weights``, ``kv_cache``,
    ``cuda_graph``; resuming a tag that is not released is refused — it kills an SGLang server),
    flush cache (no cache persists between batches here), get weights by name (at most
    ``MAX_WEIGHT_VALUES`` values per call).
  * weight-update groups: joined under a :class:`JoinPolicy` (never as rank 0, only at a named
    address — on this machine when the engine serves loopback only —, a bounded number at
    once, each within a timeout; see ``group_joins.py``).
  * device locality, simulated on the CPU: with ``device_ids`` the engine behaves as
    ``len(device_ids)`` TP ranks, rank ``k`` holding device ``device_ids[k]``; a tensor update
    needs one payload per rank, each a bucket from that rank's device (SGLang opens a CUDA handle
    only from a GPU it can see), all carrying the same tensors.

Log-probs are of the raw (temperature 1) distribution: the quantity the trainer computes.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from concurrent.futures import Future
from typing import Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from megatron_spin import platform
from megatron_spin.rollout.embedded.batching import BatchingWorker, Listener, WorkerStopped
from megatron_spin.rollout.embedded.generator import GenerationJob, GenerationOutput, HFGenerator
from megatron_spin.rollout.embedded.group_joins import JoinFailed, JoinPolicy, JoinSlots
from megatron_spin.rollout.embedded.weights import ModelWeights, load_safetensors_dir
from megatron_spin.rollout.protocol import (Completion, GenerateRequest, ProtocolError, check_names,
                                            check_weight_version, sample_seed)
from megatron_spin.wire.tensor_payload import PayloadError, decode_named_tensors
from megatron_spin.wire.update_group import UpdateGroup, create_update_group


def load_tokenizer(model_path: str):
    """The model's tokenizer, or None: /generate works on token ids; /v1/completions needs one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


class EngineUnavailable(RuntimeError):
    """The engine cannot serve this now (released memory, weights not loaded, shutting down)."""


T = TypeVar("T")
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")  # SGLang's; none given means all three
MAX_WEIGHT_VALUES = 1 << 20  # per /get_weights_by_name call: ~20 MB of JSON, a debugging peek


@dataclasses.dataclass
class PendingGeneration:
    """A submitted request: ``future`` resolves to ``(outputs, weight_version)``; cancelling it
    abandons the request (see :meth:`EmbeddedEngine.abandon`)."""

    request: GenerateRequest
    future: Future


@dataclasses.dataclass
class EngineStats:
    started: float = dataclasses.field(default_factory=time.time)
    requests: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    weight_updates: int = 0
    bytes_loaded: int = 0
    abandoned_requests: int = 0  # their clients hung up before the reply


class EmbeddedEngine:
    def __init__(self, model, tokenizer=None, *, model_path: str = "", weight_version: str = "default",
                 max_batch_tokens: int = 16384, max_batch_jobs: int = 256, max_samples_per_request: int = 1024,
                 device_ids: Optional[Sequence[str]] = None, joins: JoinPolicy = JoinPolicy(),
                 shares_weights: bool = False):
        """``device_ids``: simulate TP ranks holding these devices (see the module docstring);
        ``joins``: which weight-update groups it joins, how many at once, how long each waits;
        ``shares_weights``: the parameters are its owner's tensors (:meth:`share_weights`), and
        every update that copies into them (disk, tensor payloads, broadcasts) is refused."""
        self.model = model.eval()
        platform.prepare_inference_model(model)
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.weights = ModelWeights(model)
        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        detokenize = None if tokenizer is None else lambda ids: tokenizer.decode(ids, skip_special_tokens=True)
        self.generator = HFGenerator(model, eos_ids, max_batch_tokens=max_batch_tokens, detokenize=detokenize)
        self.weight_version = check_weight_version(weight_version, "weight_version")
        self.max_samples_per_request = max_samples_per_request
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 1 << 30)
        self.vocab_size = int(model.get_input_embeddings().num_embeddings)  # rows an id may index
        self.joins = joins
        self._join_slots = JoinSlots(joins.max_pending)
        self.stats = EngineStats()
        self._groups: dict[str, UpdateGroup] = {}
        self._groups_lock = threading.Lock()
        self.device_ids = tuple(device_ids) if device_ids else None
        self.tp_size = len(self.device_ids) if self.device_ids else 1
        self._session_open = False
        self.shares_weights = shares_weights
        self._released_tags: set[str] = set()
        self._worker = BatchingWorker(self._run_batch, max_jobs=max_batch_jobs)

    @classmethod
    def load(cls, model_path: str, device: str = "cpu", dtype: str = "float32", **kwargs) -> "EmbeddedEngine":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype),
                                                     attn_implementation="sdpa").to(device)
        return cls(model, load_tokenizer(model_path), model_path=model_path, **kwargs)

    # -- generation -------------------------------------------------------------------------
    def _run_batch(self, jobs: Sequence[GenerationJob]) -> tuple[list[GenerationOutput], str]:
        if self.weights.released:
            raise EngineUnavailable("memory is released; call /resume_memory_occupation and push weights")
        if self.weights.unloaded:
            raise EngineUnavailable(f"{len(self.weights.unloaded)} weight tensors not loaded since resume, "
                                    f"e.g. {sorted(self.weights.unloaded)[:3]}: push the full model first")
        version = self.weight_version  # updates cannot run during a batch (exclusive)
        return self.generator.run(jobs, self._worker.abandoned, self._worker.heard), version

    def submit(self, request: GenerateRequest, listener: Optional[Listener] = None) -> PendingGeneration:
        """Check ``request`` (:class:`ProtocolError` if it is bad) and queue it; collect the answer
        with :meth:`replies` once ``future`` is done.  ``listener(sample, token)`` hears each token
        as it is chosen, on the engine's thread (``sample`` = prompt index * n + sample index)."""
        self._check_limits(request)
        n = request.sampling.n
        seeds = request.seeds or (request.sampling.seed,) * len(request.input_ids)  # per prompt, or the request's
        jobs = [
            GenerationJob(tuple(p), dataclasses.replace(request.sampling, n=1,
                          seed=None if seed is None else sample_seed(seed, p, j)),
                          request.return_logprob, request.logprob_start_len, request.top_logprobs_num)
            for p, seed in zip(request.input_ids, seeds) for j in range(n)
        ]
        try:
            return PendingGeneration(request, self._worker.submit(jobs, listener))
        except WorkerStopped as exc:
            raise EngineUnavailable(str(exc)) from None

    def abandon(self, pending: PendingGeneration) -> None:
        """Its caller has gone: drop it from the queue, or stop its rows at the next decode step."""
        if pending.future.cancel():
            self.stats.abandoned_requests += 1

    def replies(self, pending: PendingGeneration) -> list[list[Completion]]:
        """``[prompt][sample]`` completions of a finished request (raises what its batch raised)."""
        request, n = pending.request, pending.request.sampling.n
        try:
            outputs, version = pending.future.result(timeout=0)
        except WorkerStopped as exc:
            raise EngineUnavailable(str(exc)) from None
        self.stats.requests += 1
        self.stats.prompt_tokens += sum(len(p) for p in request.input_ids) * n
        self.stats.generated_tokens += sum(len(o.output_ids) for o in outputs)
        replies: list[list[Completion]] = [[] for _ in request.input_ids]
        for k, out in enumerate(outputs):
            i, j = divmod(k, n)
            replies[i].append(Completion(
                prompt_index=i, sample_index=j, output_ids=tuple(out.output_ids),
                finish_reason=out.finish_reason, weight_version=version,
                prompt_tokens=len(request.input_ids[i]),
                output_logprobs=out.output_logprobs, input_logprobs=out.input_logprobs,
                output_top_logprobs=out.output_top_logprobs, input_top_logprobs=out.input_top_logprobs,
            ))
        return replies

    def generate(self, request: GenerateRequest, timeout: Optional[float] = None) -> list[list[Completion]]:
        """Submit and wait (in-process callers; the server waits without holding a thread)."""
        pending = self.submit(request)
        try:
            pending.future.exception(timeout=timeout)  # wait; the outcome is read by replies()
        except BaseException:
            self.abandon(pending)
            raise
        return self.replies(pending)

    def _check_limits(self, request: GenerateRequest) -> None:
        """Refuse what would exhaust memory or hold the engine (and so every weight push) for long."""
        if request.sampling.stop and self.generator.detokenize is None:
            raise ProtocolError("sampling_params.stop: stop strings need the model's tokenizer, and this model "
                                "has none (use stop_token_ids)")
        samples = len(request.input_ids) * request.sampling.n
        if samples > self.max_samples_per_request:
            raise ProtocolError(f"{samples} samples in one request; this engine takes at most "
                                f"{self.max_samples_per_request} (prompts x n)")
        for i, p in enumerate(request.input_ids):
            if max(p) >= self.vocab_size:  # the embedding lookup would fail inside the batch, failing its neighbours
                bad = next(k for k, t in enumerate(p) if t >= self.vocab_size)
                raise ProtocolError(f"input_ids[{i}][{bad}] = {p[bad]} is outside the vocabulary "
                                    f"[0, {self.vocab_size})")
            if len(p) + request.sampling.max_new_tokens > self.max_length:
                raise ProtocolError(f"prompt {i}: {len(p)} tokens + max_new_tokens {request.sampling.max_new_tokens} "
                                    f"exceed the model's context of {self.max_length}")
            if request.logprob_start_len >= len(p):
                raise ProtocolError(f"logprob_start_len {request.logprob_start_len} >= prompt {i}'s length {len(p)}")

    # -- weights ----------------------------------------------------------------------------
    def _refuse_copies(self, where: str) -> None:
        if self.shares_weights:
            raise ProtocolError(f"{where}: this engine serves its owner's parameters in place (transport shared); "
                                "they change only through the owner's push")

    def _install(self, named, weight_version: Optional[str], *, complete: bool, where: str) -> str:
        self._refuse_copies(where)

        def install() -> None:  # on the engine's thread (see batching.py: one OpenMP pool)
            self.weights.check(named, complete=complete, where=where)
            self.stats.bytes_loaded += self.weights.load(named)
            self.stats.weight_updates += 1
            if weight_version is not None:
                self.weight_version = weight_version

        self.run_on_engine_thread(install)
        return f"loaded {len(named)} tensors"

    def run_on_engine_thread(self, fn: Callable[[], T]) -> T:
        """``fn()`` on the thread that generates, between batches.  Tensor work in this process
        belongs there: a second thread computing keeps a second OpenMP pool, and the CPU then
        decodes ~35 % slower (:mod:`.batching`)."""
        try:
            return self._worker.call(fn)
        except WorkerStopped as exc:
            raise EngineUnavailable(str(exc)) from None

    def update_from_tensor(self, serialized: Sequence, load_format: Optional[str],
                           weight_version: Optional[str]) -> str:
        """SGLang sends one payload per engine TP rank; rank ``k`` reads entry ``k``."""
        self._refuse_copies("update_weights_from_tensor")
        self._require_session("update_weights_from_tensor")
        weight_version = check_weight_version(weight_version, "update_weights_from_tensor")
        if not isinstance(serialized, list) or len(serialized) != self.tp_size:
            raise PayloadError(f"serialized_named_tensors must be a list with one entry per engine TP rank; "
                               f"this engine has {self.tp_size}")
        ranks = [decode_named_tensors(entry, load_format,
                                      frozenset({self.device_ids[k]}) if self.device_ids else None)
                 for k, entry in enumerate(serialized)]

        def same_on_every_rank() -> None:  # simulated TP: every rank got the same tensors
            for k, other in enumerate(ranks[1:], start=1):
                if [n for n, _ in other] != [n for n, _ in ranks[0]] or not all(
                        torch.equal(a, b) for (_, a), (_, b) in zip(ranks[0], other)):
                    raise PayloadError(f"serialized_named_tensors: TP rank {k}'s payload differs from rank 0's")

        if len(ranks) > 1:
            self.run_on_engine_thread(same_on_every_rank)  # tensor work: on the engine's thread
        return self._install(ranks[0], weight_version, complete=False, where="update_weights_from_tensor")

    # -- weight-update session (SGLang >= 0.5.21) -------------------------------------------------
    def begin_weight_update(self) -> str:
        with self._worker.exclusive():
            if self._session_open:
                raise ProtocolError("a weight-update session is already open; call end_weight_update() first")
            self._session_open = True
        return "weight-update session open"

    def end_weight_update(self) -> str:
        with self._worker.exclusive():
            if not self._session_open:
                raise ProtocolError("no weight-update session is open")
            self._session_open = False
        return "weight-update session closed"

    def _require_session(self, what: str) -> None:
        if not self._session_open:
            raise ProtocolError(f"{what} must run between begin_weight_update() and end_weight_update()")

    def share_weights(self, named: Sequence[tuple[str, torch.Tensor]], weight_version: Optional[str] = None,
                      *, complete: bool = False) -> tuple[int, int]:
        """Serve ``named`` in place (an engine inside its owner's process, ``shares_weights``): see
        :meth:`ModelWeights.share`.  The whole request is checked first — names, shapes, floating
        dtypes and finite values (~half a memcpy): a diverged actor fails the push instead of
        being served.  ``complete`` (every tensor of the model) is the binding at start, the one
        call allowed outside a weight-update session.  Returns (bytes already in place, bytes
        updated)."""
        if not self.shares_weights:
            raise ProtocolError("share_weights: this engine holds weights of its own (load them instead)")
        if not complete:
            self._require_session("share_weights")
        weight_version = check_weight_version(weight_version, "share_weights")

        def share() -> tuple[int, int]:
            self.weights.check(named, complete=complete, where="share_weights")
            in_place, updated = self.weights.share(named)
            self.stats.bytes_loaded += updated
            self.stats.weight_updates += 1
            if weight_version is not None:
                self.weight_version = weight_version
            return in_place, updated

        return self.run_on_engine_thread(share)

    def update_from_disk(self, model_path: str, weight_version: Optional[str]) -> str:
        self._refuse_copies("update_weights_from_disk")
        weight_version = check_weight_version(weight_version, "update_weights_from_disk")

        def load() -> int:  # whole directory checked, then loaded, with no batch in between
            copied = load_safetensors_dir(self.weights, model_path)
            self.stats.bytes_loaded += copied
            self.stats.weight_updates += 1
            if weight_version is not None:
                self.weight_version = weight_version
            return copied

        copied = self.run_on_engine_thread(load)
        self.model_path = str(model_path)
        return f"loaded {copied} bytes from {model_path}"

    def init_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str, backend: str) -> str:
        """Join as rank ``rank_offset`` under :attr:`joins` (``ProtocolError``: not allowed;
        ``JoinsBusy``: too many joins waiting; ``JoinFailed``: the store or the peers did not answer)."""
        self.joins.check(master_address, master_port, rank_offset, world_size, group_name)
        with self._groups_lock:
            if group_name in self._groups:
                raise ProtocolError(f"weight update group {group_name!r} already exists")
        with self._join_slots:
            try:
                group = create_update_group(master_address, master_port, rank_offset, world_size, group_name,
                                            backend, join_timeout_s=self.joins.timeout_s)
            except dist.DistError as exc:  # torch's store/rendezvous errors: the peers, not this engine
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise JoinFailed(f"could not join {group_name!r} at {master_address}:{master_port} as rank "
                                 f"{rank_offset} of {world_size} (join timeout {self.joins.timeout_s:g} s): "
                                 f"{first}") from None
        with self._groups_lock:
            self._groups[group_name] = group
        return f"joined {group_name!r} as rank {rank_offset} of {world_size}"

    def destroy_update_group(self, group_name: str) -> str:
        with self._groups_lock:
            group = self._groups.pop(group_name, None)
        if group is None:
            raise ProtocolError(f"no weight update group {group_name!r}")
        group.destroy()
        return f"left {group_name!r}"

    def update_from_distributed(self, names: Sequence[str], dtypes: Sequence[str], shapes: Sequence,
                                group_name: str, weight_version: Optional[str]) -> str:
        """Receive a broadcast of ``names`` (rank 0 sends, in order), then install them.

        The receive buffers are checked against the model *before* the broadcast starts (so a
        malformed request fails without joining the collective), and the values after it.
        """
        self._refuse_copies("update_weights_from_distributed")  # before the broadcast is joined
        check_names(names, dtypes, shapes, "update_weights_from_distributed")
        self._require_session("update_weights_from_distributed")
        weight_version = check_weight_version(weight_version, "update_weights_from_distributed")
        with self._groups_lock:
            group = self._groups.get(group_name)
        if group is None:
            raise ProtocolError(f"no weight update group {group_name!r}; call /init_weights_update_group first")
        buffers = []
        for name, dt, shape in zip(names, dtypes, shapes):
            dtype = getattr(torch, str(dt).removeprefix("torch."), None)
            if not isinstance(dtype, torch.dtype):
                raise PayloadError(f"{name}: unknown dtype {dt!r}")
            if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
                raise PayloadError(f"{name}: a shape is a list of non-negative integers, got {shape!r}"[:300])
            try:
                buffers.append((name, torch.empty(tuple(shape), dtype=dtype, device="meta")))
            except (RuntimeError, TypeError) as exc:  # more elements than an int64 counts
                raise PayloadError(f"{name}: shape {shape!r} is impossible ({exc})"[:300]) from None
        self.weights.check(buffers, where="update_weights_from_distributed")
        received = []
        for name, meta in buffers:
            t = torch.empty(meta.shape, dtype=meta.dtype, device=group.device)
            group.broadcast(t, src=0)
            received.append((name, t))
        return self._install(received, weight_version, complete=False, where="update_weights_from_distributed")

    def set_weight_version(self, version: str) -> None:
        version = check_weight_version(version, "update_weight_version")
        with self._worker.exclusive():
            self.weight_version = version

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """The first ``truncate_size`` rows (SGLang's convention), at most ``MAX_WEIGHT_VALUES`` values."""
        try:
            p = self.weights.get(name)
        except KeyError:
            raise ProtocolError(f"no parameter named {name!r}") from None
        if truncate_size < 0:  # a negative slice would return all rows but the last few
            raise ProtocolError(f"truncate_size must be >= 0, got {truncate_size}")
        shape = self.weights.shape(name)  # the model's, also while the memory is released
        row = math.prod(shape[1:])
        values = min(truncate_size, shape[0] if shape else 1) * row
        if values > MAX_WEIGHT_VALUES:
            raise ProtocolError(f"truncate_size {truncate_size} asks for {values} values of {name!r}; at most "
                                f"{MAX_WEIGHT_VALUES} per call (truncate_size <= {MAX_WEIGHT_VALUES // row})")
        return self.run_on_engine_thread(lambda: p.detach()[:truncate_size].tolist())

    # -- control ----------------------------------------------------------------------------
    def pause(self) -> None:
        self._worker.pause()

    def continue_generation(self) -> None:
        self._worker.resume()

    def release_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = self._tags(tags)

        def release() -> None:
            if "weights" in tags:
                self.weights.release()
            self._released_tags |= set(tags)

        self.run_on_engine_thread(release)

    def resume_memory(self, tags: Optional[Sequence[str]] = None) -> None:
        tags = self._tags(tags)

        def resume() -> None:  # zero-filled weights: tensor work, on the engine's thread
            missing = sorted(set(tags) - self._released_tags)
            if missing:  # SGLang's scheduler raises KeyError here and the server dies
                raise ProtocolError(f"resume_memory_occupation: {missing} not released (released: "
                                    f"{sorted(self._released_tags) or 'none'})")
            if "weights" in tags:
                self.weights.resume()
            self._released_tags -= set(tags)

        self.run_on_engine_thread(resume)

    @staticmethod
    def _tags(tags: Optional[Sequence[str]]) -> tuple[str, ...]:
        tags = tuple(tags) if tags else MEMORY_TAGS
        bad = [t for t in tags if t not in MEMORY_TAGS]
        if bad:
            raise ProtocolError(f"unknown memory tags {bad}; known: {list(MEMORY_TAGS)}")
        return tags

    def shutdown(self) -> None:
        self._worker.stop()

    @property
    def paused(self) -> bool:
        return self._worker.paused

    def info(self) -> dict:
        return {
            "model_path": self.model_path,
            "weight_version": self.weight_version,
            "paused": self.paused,
            "memory_released": self.weights.released,
            "released_tags": sorted(self._released_tags),
            "weight_update_session": self._session_open,
            "device_ids": list(self.device_ids or ()),
            "unloaded_tensors": len(self.weights.unloaded),
            "batches": self._worker.batches_run,
            **dataclasses.asdict(self.stats),
        }
