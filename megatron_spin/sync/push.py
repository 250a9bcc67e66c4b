"""One weight push from the actor to the rollout fleet: a coordinator beside the fleet, a sender on every rank.

    coordinator = PushCoordinator(arch, fleet, make_transport(cfg, target))   # the driver
    sender = StageSender(cfg, target, arch, pctx, node_address)                 # every trainer rank
    plan = coordinator.prepare(version)                                         # driver
    results = [sender.send(actor.modules, plan) for every rank]                 # ranks, collectively
    report = coordinator.finish(plan, results)                                  # driver

The steps:
  1. the coordinator picks the engines (the fleet's reachable ones), pauses them, flushes their
     cache, opens their weight-update session (closing one a failed push left open), and hands
     every rank the plan (which engines, by index and URL);
  2. the ranks send, by one of two routes:
     * **feed** (``tensor`` transport): every engine TP rank is fed from memory on its own device by
       the trainer rank that shares it (:mod:`.routing`, :mod:`.feed`) — the feeders gather each
       full parameter (TP all-gather, then a broadcast along the pipeline) and send buckets;
     * **stage** (``disk``, ``distributed``): each pipeline stage gathers its own TP shards and its
       pusher (TP rank 0 of DP replica 0) sends them — stages in parallel for disk, one after
       another for a distributed push (an engine serves group broadcasts one at a time, in
       arrival order, so two stages' broadcasts interleaved across engines would deadlock);
     never a second full copy of the weights on a rank.  A MoE model under expert parallelism
     keeps only ``E/EP`` experts of each layer in a replica: the EP peers of replica 0's ranks
     (other replicas) lend theirs to the stage walk, and in the feed route every replica of an
     EP group holding a feeder walks (:mod:`.gather`), so every expert is sent;
  3. the receipts (names sent, to which engines, bytes, failed engines) reach the coordinator,
     which checks that every engine received every HF tensor of the converter table exactly
     once: otherwise :class:`SyncError`, and the version is **not** advanced;
  4. only then does it commit (disk: index + load; others: set ``weight_version``), close the
     update sessions, resume generation and re-admit engines that were waiting for weights.

After a failed push the engines hold possibly mixed weights: they serve nothing until a push
completes, but their sessions are closed and generation continued (best effort) so that the
next push can open a session and a health probe answers.
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
from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.precision import torch_dtypes
from megatron_spin.sync.config import PushTarget, SyncConfig, TransportKind
from megatron_spin.sync.feed import ColocatedFeed
from megatron_spin.sync.gather import iter_full_hf_weights, iter_hf_weights
from megatron_spin.sync.transports import Receipt, Transport, make_transport
from megatron_spin.wire.bucket import bucketed

log = logging.getLogger("megatron_spin.sync")


class SyncError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class SyncReport:
    version: str
    engines: int
    tensors: int
    bytes: int
    buckets: int
    seconds: float
    send_seconds: float  # slowest rank: gather + convert + send
    commit_seconds: float
    dropped: tuple[str, ...] = ()
    serving: tuple[str, ...] = ()  # engines that now serve this version

    def as_metrics(self) -> dict[str, float]:
        return {"sync/seconds": self.seconds, "sync/send_seconds": self.send_seconds,
                "sync/commit_seconds": self.commit_seconds, "sync/gbytes": self.bytes / 1e9,
                "sync/gbytes_per_s": self.bytes / 1e9 / max(self.seconds, 1e-9), "sync/engines": self.engines}


def check_receipts(arch: ModelArch, receipts: Sequence[Receipt], urls: Sequence[str]) -> None:
    """Every engine of ``urls`` that did not fail must have received every HF tensor, each once."""
    expected = Counter(converter_for(arch).hf_names(arch))
    failed = {u for r in receipts for u in r.failed}
    for url in urls:
        if url in failed:
            continue
        sent = Counter(n for r in receipts if url in r.engines for n in r.names)
        missing, extra = sorted(expected - sent), sorted(sent - expected)
        if missing or extra:
            raise SyncError(f"partial push to {url}: {len(missing)} tensors missing (e.g. {missing[:3]}), "
                            f"{len(extra)} unexpected or repeated (e.g. {extra[:3]}); weight_version not advanced")


@dataclasses.dataclass(frozen=True)
class PushPlan:
    """What the coordinator tells every rank before a push."""

    version: str
    engines: tuple[tuple[int, str], ...]  # (engine index, URL) of this push's engines
    reform: bool  # an engine is new or came back, or the last push failed: rebuild update groups
    started: float

    @property
    def urls(self) -> tuple[str, ...]:
        return tuple(u for _, u in self.engines)


@dataclasses.dataclass(frozen=True)
class StageResult:
    """One rank's part of a push: what it delivered (senders only) or why it failed."""

    receipt: Optional[Receipt]
    error: Optional[str]
    seconds: float


def _close_session(client: EngineClient) -> None:
    """Best effort after a failed push: end the weight-update session, let generation continue."""
    for call in (client.end_weight_update, client.continue_generation):
        try:
            call()
        except EngineError as exc:
            log.warning("engine %s: %s", client.url, exc)


class PushCoordinator:
    """The half of a push that talks to the fleet: prepare, then check and commit.

    It lives where the fleet lives (the driver) and never touches the model.  ``transport`` is
    used for its commit step only (disk: write the index and load; others: set the version).
    """

    def __init__(self, arch: ModelArch, fleet: RolloutFleet, transport: Transport):
        self.arch, self.fleet, self.transport = arch, fleet, transport
        self._last_failed = False

    def prepare(self, version: int | str) -> PushPlan:
        """Re-admit dropped engines that answer again, then pause every reachable engine, flush its
        cache, open its update session."""
        self.fleet.probe()  # a re-admitted engine takes this push and serves once it completes
        engines, fresh = [], False
        for index, slot in enumerate(self.fleet.slots):
            if slot not in self.fleet.reachable:
                continue
            c = slot.client
            try:
                c.pause()
                try:
                    c.flush_cache()  # frees the KV cache before the load; a refusal is not fatal
                except EngineError as exc:
                    log.warning("engine %s did not flush its cache before the push: %s", c.url, exc)
                c.begin_weight_update()
            except EngineError as exc:
                _close_session(c)
                self.fleet.drop(slot, exc)
                continue
            engines.append((index, c.url))
            fresh = fresh or slot.needs_sync
        if not engines:
            raise SyncError("no reachable engine to push weights to")
        return PushPlan(str(version), tuple(engines), fresh or self._last_failed, time.monotonic())

    def finish(self, plan: PushPlan, results: Sequence[StageResult]) -> SyncReport:
        """Given every rank's result: commit, or raise one :class:`SyncError`."""
        errors = [r.error for r in results if r.error]
        receipts = [r.receipt for r in results if r.receipt is not None]
        try:
            if errors:
                raise SyncError(f"weight push {plan.version} failed: " + "; ".join(errors))
            report = self._commit(plan, receipts, max(r.seconds for r in results))
        except SyncError:
            # Engines may now hold a mix of old and new weights: none serves until a push completes;
            # their sessions are closed so that the next push can open one.
            for url in plan.urls:
                _close_session(self.fleet.slot(url).client)
            self.fleet.mark_needs_sync(plan.urls)
            self._last_failed = True
            raise
        self._last_failed = False
        return report

    def _commit(self, plan: PushPlan, receipts: list[Receipt], send_seconds: float) -> SyncReport:
        check_receipts(self.arch, receipts, plan.urls)
        failed = {u: e for r in receipts for u, e in r.failed.items()}
        pushed = [self.fleet.slot(u).client for u in plan.urls if u not in failed]  # *this* push's engines
        commit_started = time.monotonic()
        failed.update(self.transport.commit(pushed, plan.version, receipts))
        for url in plan.urls:
            slot = self.fleet.slot(url)
            if url in failed:
                _close_session(slot.client)
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
        one = [r for r in receipts if self.fleet.serving[0].client.url in r.engines]  # what one engine received
        return SyncReport(
            version=plan.version, engines=len(self.fleet.serving), tensors=sum(len(r.names) for r in one),
            bytes=sum(r.bytes for r in one), buckets=sum(r.buckets for r in one), seconds=now - plan.started,
            send_seconds=send_seconds, commit_seconds=now - commit_started, dropped=tuple(sorted(failed)),
            serving=tuple(s.client.url for s in self.fleet.serving),
        )


def _any_over_ep(flag: bool, pctx) -> bool:
    """Whether ``flag`` holds on any rank of this rank's EP group (collective over it under EP;
    at EP=1 just ``flag``, with no collective)."""
    if pctx.layout.ep == 1:
        return flag
    flags: list = [None] * dist.get_world_size(pctx.ep_group)
    dist.all_gather_object(flags, flag, group=pctx.ep_group)
    return any(flags)


def _ep_peer_of_replica_0(pctx) -> bool:
    """Whether this rank's EP group holds DP replica 0's rank at its TP rank and stage (read from
    the groups, no collective): rank 0 of the data-parallel group is DP rank 0."""
    if pctx.layout.ep == 1:
        return False
    return dist.get_global_rank(pctx.dp_group, 0) in dist.get_process_group_ranks(pctx.ep_group)


class StageSender:
    """The half of a push that runs on every trainer rank (see the module docstring for the two
    routes).  Never raises for a transport failure: the error travels in the result."""

    def __init__(self, cfg: SyncConfig, target: PushTarget, arch: ModelArch, pctx, address: str,
                 transport: Optional[Transport] = None):
        """``address``: this rank's node address as the engines reach it (a distributed push's
        group is hosted there).  ``transport``: a stage transport built elsewhere (tests inject
        faults).  Collective: every rank builds its sender together (the feed route makes groups)."""
        self.cfg, self.target, self.arch, self.pctx = cfg, target, arch, pctx
        self.dtype = torch_dtypes()[cfg.dtype] if cfg.dtype else None
        self._clients: dict[str, EngineClient] = {}  # by URL; the feed borrows them
        self.feed: Optional[ColocatedFeed] = None
        self.transport: Optional[Transport] = None
        if cfg.transport == TransportKind.TENSOR:
            if target.route is None:
                raise ValueError("the tensor transport needs a feed route (PushTarget.route)")
            self.feed = ColocatedFeed(target.route, pctx.rank, target.engine_tp_size, cfg.load_format,
                                      self.client, cfg.group_timeout_s)
            # Under EP a replica that feeds nothing still walks when an EP peer's replica feeds:
            # that replica's experts are partly here.
            self._replica_feeds = _any_over_ep(bool(target.route.feeder_ranks & set(pctx.model_parallel_ranks)), pctx)
        else:
            self.is_pusher = pctx.dp_rank == 0 and pctx.tp_rank == 0
            self.transport = (transport or make_transport(cfg, target, address)) if self.is_pusher else None
            # A rank of another replica in the EP group of one of replica 0's ranks holds experts
            # that replica lacks: it lends them to the walk (never sends).
            self._lends_experts = pctx.dp_rank != 0 and _ep_peer_of_replica_0(pctx)

    def client(self, url: str) -> EngineClient:
        if url not in self._clients:
            self._clients[url] = EngineClient(url, api_key=self.target.api_key)
        return self._clients[url]

    def send(self, modules: list, plan: PushPlan) -> StageResult:
        started = time.monotonic()
        try:
            receipt, error = self._feed(modules, plan) if self.feed is not None else self._stage(modules, plan)
        finally:
            platform.current().release_ipc_memory()  # CUDA: blocks the engines have let go of
        return StageResult(receipt, error, time.monotonic() - started)

    # -- feed: every engine rank from its own device ----------------------------------------------
    def _feed(self, modules: list, plan: PushPlan) -> tuple[Optional[Receipt], Optional[str]]:
        stream = iter_full_hf_weights(modules, self.arch, self.pctx, self.dtype, replica_feeds=self._replica_feeds,
                                      feeder=self.feed.is_feeder)
        try:
            return self.feed.push(stream, self.cfg.bucket_bytes, dict(plan.engines)), None
        except (KeyError, ValueError, RuntimeError) as exc:  # a conversion error: the same on every feeder
            return None, f"rank {self.pctx.rank}: {type(exc).__name__}: {exc}"

    # -- stage: each stage's pusher sends its own layers ------------------------------------------
    def _stage(self, modules: list, plan: PushPlan) -> tuple[Optional[Receipt], Optional[str]]:
        if self.pctx.dp_rank != 0:
            return (None, self._lend_experts(modules)) if self._lends_experts else (None, None)
        serial = self.cfg.transport == TransportKind.DISTRIBUTED and self.pctx.layout.pp > 1
        receipt = error = None
        for stage in range(self.pctx.layout.pp if serial else 1):
            if not serial or stage == self.pctx.pp_rank:
                receipt, error = self._send_stage(modules, plan)
            if serial:
                dist.barrier(group=self.pctx.pp_group)  # the next stage starts when this one is done
        return receipt, error

    def _send_stage(self, modules: list, plan: PushPlan) -> tuple[Optional[Receipt], Optional[str]]:
        receipt = error = None
        stream = iter_hf_weights(modules, self.arch, self.pctx, self.dtype)
        try:
            if self.is_pusher:
                error = self._send_all(stream, [self.client(u) for u in plan.urls], plan)
                receipt = self.transport.close()
            else:
                for _ in stream:  # TP peers gather with the pusher
                    pass
        except (KeyError, ValueError, RuntimeError) as exc:  # the same on every TP rank of the stage
            error = f"rank {self.pctx.rank}: {type(exc).__name__}: {exc}"
        return receipt, error

    def _lend_experts(self, modules: list) -> Optional[str]:
        """Walk the expert part of replica 0's stage walk (EP broadcasts), sending nothing.  No
        stage barrier: the broadcasts wait for replica 0's stage to reach them."""
        try:
            for _ in iter_hf_weights(modules, self.arch, self.pctx, self.dtype, experts_only=True):
                pass
        except (KeyError, ValueError, RuntimeError) as exc:  # the same on the pusher's side
            return f"rank {self.pctx.rank}: {type(exc).__name__}: {exc}"
        return None

    def _send_all(self, stream, engines: list[EngineClient], plan: PushPlan) -> Optional[str]:
        """Send every bucket; after a failure keep walking (TP peers gather with us) without sending."""
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

