"""One weight push from the actor to the rollout fleet: a coordinator beside the fleet, a sender on every rank.

    coordinator = PushCoordinator(arch, fleet, make_transport(cfg, target))   # the driver
    sender = StageSender(cfg, target, arch, pctx, node_address)                 # every trainer rank
    plan = coordinator.prepare(version)                                         # driver
    results = [sender.send(actor.modules, plan) for every rank]                 # ranks, collectively
    report = coordinator.finish(plan, results)                                  # driver

The steps (*pushers* = TP rank 0 of every stage of DP replica 0):
  1. the coordinator picks the engines (the fleet's reachable ones), pauses them, flushes their
     cache, opens their update session, and hands every rank the plan (which engines);
  2. each pipeline stage gathers its TP shards parameter by parameter, converts them to HF
     tensors through the converter table, and its pusher sends them in buckets of
     ``bucket_bytes`` — stages in parallel, never a second full copy of the weights on a rank;
  3. the pushers' receipts (names sent, bytes, failed engines) reach the coordinator, which
     checks them against the converter table's complete list of HF names: a missing or
     duplicated tensor is a :class:`SyncError` and the version is **not** advanced;
  4. only then does it commit (disk: index + load; others: set ``weight_version``), close the
     update session, resume generation and re-admit engines that were waiting for weights.

After a failed push the engines stay paused: their weights may be half old, half new, and no
sample should be generated from them until a push completes.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import Counter
from typing import Optional, Sequence

from megatron_spin.convert import converter_for
from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.rollout.fleet import RolloutFleet
from megatron_spin.spec.arch import ModelArch
from megatron_spin.spec.precision import DTYPES
from megatron_spin.sync.config import PushTarget, SyncConfig
from megatron_spin.sync.gather import iter_hf_weights
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


@dataclasses.dataclass(frozen=True)
class StageResult:
    """One rank's part of a push: what its transport sent (pushers only) or why it failed."""

    receipt: Optional[Receipt]
    error: Optional[str]
    seconds: float


class PushCoordinator:
    """The half of a push that talks to the fleet: prepare, then check and commit.

    It lives where the fleet lives (the driver) and never touches the model.  ``transport`` is
    used for its commit step only (disk: write the index and load; others: set the version).
    """

    def __init__(self, arch: ModelArch, fleet: RolloutFleet, transport: Transport):
        self.arch, self.fleet, self.transport = arch, fleet, transport
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

    def finish(self, plan: PushPlan, results: Sequence[StageResult]) -> SyncReport:
        """Given every rank's result: commit, or raise one :class:`SyncError`."""
        errors = [r.error for r in results if r.error]
        receipts = [r.receipt for r in results if r.receipt is not None]
        try:
            if errors:
                raise SyncError(f"weight push {plan.version} failed: " + "; ".join(errors))
            report = self._commit(plan, receipts, max(r.seconds for r in results))
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

    def __init__(self, cfg: SyncConfig, target: PushTarget, arch: ModelArch, pctx, address: str,
                 transport: Optional[Transport] = None):
        """``address``: this rank's node address as the engines reach it (a distributed push's
        group is hosted there).  ``transport``: one built elsewhere (tests inject faults)."""
        self.cfg, self.target, self.arch, self.pctx = cfg, target, arch, pctx
        self.is_pusher = pctx.dp_rank == 0 and pctx.tp_rank == 0
        self.transport = (transport or make_transport(cfg, target, address)) if self.is_pusher else None
        self._clients: dict[str, EngineClient] = {}

    def client(self, url: str) -> EngineClient:
        if url not in self._clients:
            self._clients[url] = EngineClient(url, api_key=self.target.api_key)
        return self._clients[url]

    def send(self, modules: list, plan: PushPlan) -> StageResult:
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
        return StageResult(receipt, error, time.monotonic() - started)

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
