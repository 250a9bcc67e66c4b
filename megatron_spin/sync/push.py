"""One weight push from the actor to the rollout fleet, called collectively by every trainer rank.

    sync = WeightSync(SyncConfig(transport="tensor"), arch, pctx, fleet_on_rank0)
    report = sync.push(actor.modules, version=step)

The steps (rank 0 = global rank 0, *pushers* = TP rank 0 of every stage of DP replica 0):
  1. rank 0 picks the engines (the fleet's reachable ones), pauses them, flushes their cache,
     opens their update session, and tells every rank which engines to push to;
  2. each pipeline stage gathers its TP shards parameter by parameter, converts them to HF
     tensors through the converter table, and its pusher sends them in buckets of
     ``bucket_bytes`` — stages in parallel, never a second full copy of the weights on a rank;
  3. the pushers' receipts (names sent, bytes, failed engines) are gathered on rank 0, which
     checks them against the converter table's complete list of HF names: a missing or
     duplicated tensor is a :class:`SyncError` and the version is **not** advanced;
  4. only then does rank 0 commit (disk: index + load; others: set ``weight_version``), close
     the update session, resume generation and re-admit engines that were waiting for weights.
Every rank returns the same report or raises the same :class:`SyncError`.

After a failed push the engines stay paused: their weights may be half old, half new, and no
sample should be generated from them until a push completes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Optional, Sequence

import torch.distributed as dist

from megatron_spin import platform
from megatron_spin.convert import converter_for
from megatron_spin.models.arch import ModelArch
from megatron_spin.models.precision import DTYPES
from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.rollout.tensor_payload import LOAD_FORMATS
from megatron_spin.sync.bucket import bucketed
from megatron_spin.sync.gather import iter_hf_weights
from megatron_spin.sync.transports import TRANSPORTS, Receipt, Transport, make_transport


log = logging.getLogger("megatron_spin.sync")


class SyncError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class SyncConfig:
    transport: str = "tensor"  # tensor | disk | distributed
    bucket_bytes: int = 512 * 1024**2
    dtype: Optional[str] = None  # cast before sending (None: the actor's parameter dtype)
    load_format: Optional[str] = "flattened_bucket"  # tensor transport: None sends (name, tensor) lists
    engine_tp_size: int = 1
    disk_dir: Optional[str] = None  # disk transport: a directory every engine can read
    backend: Optional[str] = None  # distributed transport: None = the platform's (nccl on GPUs, gloo on CPU)
    master_address: str = "127.0.0.1"  # distributed transport: the pushers' address as engines see it
    group_timeout_s: float = 300.0  # distributed transport: a broadcast no engine receives fails after this
    api_key: Optional[str] = None

    def __post_init__(self):
        where = "sync"
        if self.transport not in TRANSPORTS:
            raise ValueError(f"{where}.transport must be one of {TRANSPORTS}, got {self.transport!r}")
        if self.bucket_bytes < 0:
            raise ValueError(f"{where}.bucket_bytes must be >= 0, got {self.bucket_bytes}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"{where}.dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in LOAD_FORMATS:
            raise ValueError(f"{where}.load_format must be one of {LOAD_FORMATS}, got {self.load_format!r}")
        if self.engine_tp_size < 1:
            raise ValueError(f"{where}.engine_tp_size must be >= 1, got {self.engine_tp_size}")
        if self.group_timeout_s <= 0:
            raise ValueError(f"{where}.group_timeout_s must be > 0, got {self.group_timeout_s}")
        if self.transport == "disk" and not self.disk_dir:
            raise ValueError(f"{where}.disk_dir is required with transport=disk")

    def build_transport(self, side_files: Optional[str] = None) -> Transport:
        if self.transport == "tensor":
            return make_transport("tensor", load_format=self.load_format, engine_tp_size=self.engine_tp_size)
        if self.transport == "disk":
            return make_transport("disk", root=self.disk_dir, side_files=side_files)
        return make_transport("distributed", master_address=self.master_address,
                              backend=self.backend or platform.current().backend, engine_tp_size=self.engine_tp_size,
                              timeout_s=self.group_timeout_s)


@dataclasses.dataclass(frozen=True)
class SyncReport:
    version: str
    engines: int
    tensors: int
    bytes: int
    buckets: int
    seconds: float
    send_seconds: float  # slowest stage: gather + convert + send
    commit_seconds: float
    dropped: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()  # engines that now serve this version

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/send_seconds": self.send_seconds,
                "sync/commit_seconds": self.commit_seconds, "sync/gbytes": self.bytes / 1e9,
                "sync/gbytes_per_s": self.bytes / 1e9 / max(self.seconds, 1e-9), "sync/engines": self.engines}


def check_receipts(arch: ModelArch, receipts: list[Receipt]) -> None:
    """The union of what the stages sent must be every HF tensor of the model, each once."""
    expected = Counter(converter_for(arch).hf_names(arch))
    sent = Counter(n for r in receipts for n in r.names)
    missing = sorted(expected - sent)
    extra = sorted(sent - expected)
    if missing or extra:
        raise SyncError(f"partial push: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                        f"{len(extra)} unexpected or repeated (e.g. {extra[:3]}); weight_version not advanced")


@dataclasses.dataclass(frozen=True)
class PushPlan:
    """What the coordinator tells every rank before a push."""

    version: str
    urls: tuple[str, ...]
    reform: bool  # an engine is new or came back, or the last push failed: rebuild update groups
    started: float


class PushCoordinator:
    """The half of a push that talks to the fleet: prepare, then check and commit.

    It lives wherever the fleet lives — global rank 0 in an SPMD launch, the driver when Ray
    places the trainer ranks — and never touches the model.
    """

    def __init__(self, cfg: SyncConfig, arch: ModelArch, fleet: RolloutFleet, transport: Transport):
        self.cfg, self.arch, self.fleet, self.transport = cfg, arch, fleet, transport
        self._last_failed = False

    def prepare(self, version: int | str) -> PushPlan:
        """Pause every reachable engine, flush its cache, open its update session."""
        urls, fresh = [], False
        for slot in self.fleet.reachable:
            c = slot.client
            try:
                c.pause()
                try:
                    c.flush_cache()  # frees the KV cache before the load; a refusal is not fatal
                except EngineError as exc:
                    log.warning("engine %s did not flush its cache before the push: %s", c.url, exc)
                c.begin_weight_update()
            except EngineError as exc:
                self.fleet.drop(slot, exc)
                continue
            urls.append(c.url)
            fresh = fresh or slot.needs_sync
        if not urls:
            raise SyncError("no reachable engine to push weights to")
        return PushPlan(str(version), tuple(urls), fresh or self._last_failed, time.monotonic())

    def finish(self, plan: PushPlan, results: list[tuple[Optional[Receipt], Optional[str], float]]) -> SyncReport:
        """Given every rank's (receipt, error, seconds): commit, or raise one :class:`SyncError`."""
        errors = [e for _, e, _ in results if e]
        receipts = [r for r, _, _ in results if r is not None]
        try:
            if errors:
                raise SyncError(f"weight push {plan.version} failed: " + "; ".join(errors))
            report = self._commit(plan, receipts, max(t for _, _, t in results))
        except SyncError:
            # Engines may now hold a mix of old and new weights: none serves until a push completes.
            self.fleet.mark_needs_sync(plan.urls)
            self._last_failed = True
            raise
        self._last_failed = False
        return report

    def _commit(self, plan: PushPlan, receipts: list[Receipt], send_seconds: float) -> SyncReport:
        check_receipts(self.arch, receipts)
        failed = {u: e for r in receipts for u, e in r.failed.items()}
        pushed = [self.fleet.slot(u).client for u in plan.urls if u not in failed]  # *this* push's engines
        commit_started = time.monotonic()
        failed.update(self.transport.commit(pushed, plan.version, receipts))
        for url in plan.urls:
            slot = self.fleet.slot(url)
            if url in failed:
                self.fleet.drop(slot, EngineError(url, "push", failed[url]))
                continue
            try:
                slot.client.end_weight_update()
                slot.client.continue_generation()
            except EngineError as exc:
                self.fleet.drop(slot, exc)
        self.fleet.mark_synced(plan.version, plan.urls)
        if not self.fleet.serving:
            raise SyncError(f"weight push {plan.version}: no engine took it ({failed})")
        now = time.monotonic()
        return SyncReport(
            version=plan.version, engines=len(self.fleet.serving), tensors=sum(len(r.names) for r in receipts),
            bytes=sum(r.bytes for r in receipts), buckets=sum(r.buckets for r in receipts),
            seconds=now - plan.started, send_seconds=send_seconds, commit_seconds=now - commit_started,
            dropped=tuple(sorted(failed)), serving=tuple(s.client.url for s in self.fleet.serving),
        )


class StageSender:
    """The half of a push that runs on every trainer rank: gather, convert, bucket, send.

    Ranks of data-parallel replica 0 walk their stage's parameters (the TP gathers are
    collective); the stage's pusher (TP rank 0) sends.  A pusher whose transport fails keeps
    walking without sending, so that its TP peers, gathering with it, finish too.  Never
    raises for a transport failure: the error travels in the result.
    """

    def __init__(self, cfg: SyncConfig, arch: ModelArch, pctx, side_files: Optional[str] = None,
                 transport: Optional[Transport] = None, clients: Sequence[EngineClient] = ()):
        """``clients``: engine clients owned elsewhere (a fleet's) to use instead of opening new ones."""
        self.cfg, self.arch, self.pctx = cfg, arch, pctx
        self.is_pusher = pctx.dp_rank == 0 and pctx.tp_rank == 0
        self.transport = (transport or cfg.build_transport(side_files)) if self.is_pusher else None
        self._borrowed = {c.url: c for c in clients}
        self._clients: dict[str, EngineClient] = {}

    def client(self, url: str) -> EngineClient:
        if url in self._borrowed:
            return self._borrowed[url]
        if url not in self._clients:
            self._clients[url] = EngineClient(url, api_key=self.cfg.api_key)
        return self._clients[url]

    def send(self, modules: list, plan: PushPlan) -> tuple[Optional[Receipt], Optional[str], float]:
        started = time.monotonic()
        receipt, error = None, None
        if self.pctx.dp_rank == 0:
            dtype = DTYPES[self.cfg.dtype] if self.cfg.dtype else None
            stream = iter_hf_weights(modules, self.arch, self.pctx, dtype)
            try:
                if self.is_pusher:
                    error = self._send_all(stream, [self.client(u) for u in plan.urls], plan)
                    receipt = self.transport.close()
                else:
                    for _ in stream:
                        pass
            except (KeyError, ValueError, RuntimeError) as exc:  # the same on every TP rank of the stage
                error = f"rank {self.pctx.rank}: {type(exc).__name__}: {exc}"
        return receipt, error, time.monotonic() - started

    def _send_all(self, stream, engines: list[EngineClient], plan: PushPlan) -> Optional[str]:
        error = None
        try:
            self.transport.open(engines, self.pctx.pp_rank, plan.version, reform=plan.reform)
        except (EngineError, RuntimeError, OSError, ValueError) as exc:
            error = f"stage {self.pctx.pp_rank}: {type(exc).__name__}: {exc}"
        for bucket in bucketed(stream, self.cfg.bucket_bytes):
            if error is None:
                try:
                    self.transport.send(bucket)
                except (EngineError, RuntimeError, OSError, ValueError) as exc:
                    error = f"stage {self.pctx.pp_rank}: {type(exc).__name__}: {exc}"
        return error

    def close(self) -> None:
        if self.transport is not None:
            self.transport.shutdown()
        for c in self._clients.values():
            c.close()


class WeightSync:
    """A push in an SPMD launch: the coordinator on global rank 0, a sender on every rank.

    Failures anywhere become one :class:`SyncError` raised on every rank: each rank always
    enters every collective of the protocol (plan broadcast, result gather, outcome broadcast).
    """

    def __init__(self, cfg: SyncConfig, arch: ModelArch, pctx, fleet: Optional[RolloutFleet] = None,
                 side_files: Optional[str] = None, transport: Optional[Transport] = None):
        """``fleet`` is needed on global rank 0 only (the others learn the engine list from it)."""
        if pctx.rank == 0 and fleet is None:
            raise ValueError("WeightSync needs the rollout fleet on rank 0")
        self.pctx = pctx
        clients = [s.client for s in fleet.slots] if pctx.rank == 0 else []  # rank 0 reuses the fleet's
        self.sender = StageSender(cfg, arch, pctx, side_files, transport, clients=clients)
        if pctx.rank == 0:
            self.coordinator = PushCoordinator(cfg, arch, fleet, self.sender.transport)

    def push(self, modules: list, version: int | str) -> SyncReport:
        plan: list = [None]
        if self.pctx.rank == 0:
            try:
                plan[0] = self.coordinator.prepare(version)
            except (SyncError, EngineError) as exc:
                plan[0] = str(exc)
        dist.broadcast_object_list(plan, src=0)
        if isinstance(plan[0], str):
            raise SyncError(plan[0])
        result = self.sender.send(modules, plan[0])
        gathered: list = [None] * self.pctx.world_size
        dist.all_gather_object(gathered, result)
        outcome: list = [None]
        if self.pctx.rank == 0:
            try:
                outcome[0] = self.coordinator.finish(plan[0], gathered)
            except SyncError as exc:
                outcome[0] = str(exc)
        dist.broadcast_object_list(outcome, src=0)
        if isinstance(outcome[0], str):
            raise SyncError(outcome[0])
        return outcome[0]

    def close(self) -> None:
        self.sender.close()  # borrowed fleet clients stay open: the fleet's owner closes them
