"""How a stage's buckets of HF tensors reach the engines: by disk, by broadcast, or in place.

A transport lives on one *pusher* (TP rank 0 of a pipeline stage of data-parallel replica 0):

    transport.open(engines, stage, version)   # per push
    transport.send(bucket)                    # per bucket, in order
    receipt = transport.close()               # what this pusher sent (picklable)
    transport.commit(engines, version, receipts)  # the coordinator, after every stage has closed

* the ``tensor`` transport does not go through a stage pusher: every engine rank is fed from its
  own device (:mod:`megatron_spin.sync.feed`); here it only commits the version.
* ``DiskTransport`` — each stage writes its buckets as safetensors shards into a directory on
  storage the engines can read; rank 0 writes the index and calls ``/update_weights_from_disk``.
  Works across hosts with a shared file system; slowest.
* ``SharedTransport`` — the engine runs inside the (only) trainer rank and serves the actor's
  parameters in place; a push re-binds views and copies only what the converter had to build.
* ``DistributedTransport`` — each pusher forms a process group with every engine rank
  (``/init_weights_update_group``; NCCL on GPUs, gloo here) and broadcasts each bucket's
  tensors after announcing names, dtypes and shapes (``/update_weights_from_distributed``).

Engines are sent to concurrently.  A failing engine does not stop the push to the others: it
is listed in the receipt and dropped from the fleet by the caller.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import dataclasses
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Callable, Optional, Sequence


from megatron_spin import platform
from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.sync.config import PushTarget, SyncConfig, TransportKind
from megatron_spin.wire.bucket import NamedTensors, nbytes
from megatron_spin.wire.update_group import create_update_group, host_store


@dataclasses.dataclass
class Receipt:
    """What one sender delivered: tensor names in order, to which engines, bytes, buckets, and
    the engines that failed.  ``stage``: the pipeline stage of a stage push (a feeder's rank)."""

    stage: int
    engines: list[str] = dataclasses.field(default_factory=list)  # URLs these tensors went to
    names: list[str] = dataclasses.field(default_factory=list)
    bytes: int = 0
    buckets: int = 0
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # url -> error
    files: dict[str, str] = dataclasses.field(default_factory=dict)  # disk: tensor name -> shard file


class Transport(abc.ABC):
    name = ""

    def __init__(self):
        self._pool: Optional[cf.ThreadPoolExecutor] = None
        self._pool_size = 0
        self.engines: list[EngineClient] = []
        self.receipt = Receipt(stage=0)
        self.version = ""

    def open(self, engines: Sequence[EngineClient], stage: int, version: str, reform: bool = False) -> None:
        """Start a push to ``engines``; ``reform``: an engine is new or came back (group transports
        must build their groups afresh)."""
        self.engines, self.version = list(engines), version
        self.receipt = Receipt(stage=stage, engines=[e.url for e in self.engines])
        self._ensure_pool(len(self.engines))

    def _ensure_pool(self, engines: int) -> None:
        # One thread per engine at least: group calls block until *every* member has joined, so a
        # pool smaller than the fleet would deadlock.
        if self._pool is None or self._pool_size < engines + 1:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            self._pool_size = max(4, engines + 1)
            self._pool = cf.ThreadPoolExecutor(max_workers=self._pool_size, thread_name_prefix=f"sync-{self.name}")

    def send(self, bucket: NamedTensors) -> None:
        live = [e for e in self.engines if e.url not in self.receipt.failed]
        moved = self._send(bucket, live)
        self.receipt.names += [n for n, _ in bucket]
        self.receipt.bytes += sum(nbytes(t) for _, t in bucket) if moved is None else moved
        self.receipt.buckets += 1

    @abc.abstractmethod
    def _send(self, bucket: NamedTensors, engines: list[EngineClient]) -> Optional[int]:
        """Deliver ``bucket``; the bytes that moved, or None for all of them."""
    def close(self) -> Receipt:
        return self.receipt

    def commit(self, engines: Sequence[EngineClient], version: str, receipts: Sequence[Receipt]) -> dict[str, str]:
        """The coordinator, after a complete push: make ``version`` current; returns failed url -> error."""
        return self._each(engines, lambda e: e.update_weight_version(version))

    @staticmethod
    def committing_only() -> "Transport":
        """The coordinator's side of a push whose tensors travel another way (the feed route)."""
        return _VersionCommit()

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    def _each(self, engines: Sequence[EngineClient], fn: Callable[[EngineClient], object]) -> dict[str, str]:
        self._ensure_pool(len(engines))
        futures = {self._pool.submit(fn, e): e for e in engines}
        failed = {}
        for fut in cf.as_completed(futures):
            try:
                fut.result()
            except (EngineError, OSError, RuntimeError, ValueError) as exc:
                failed[futures[fut].url] = str(exc)
        return failed

    def _record(self, failed: dict[str, str]) -> None:
        self.receipt.failed.update(failed)


class DiskTransport(Transport):
    name = "disk"

    def __init__(self, root: str | os.PathLike, side_files: Optional[str | os.PathLike] = None):
        super().__init__()
        self.root = Path(root)
        self.side_files = Path(side_files) if side_files else None

    def version_dir(self, version: str) -> Path:
        return self.root / f"weights-v{version}"

    def open(self, engines, stage, version, reform: bool = False) -> None:
        super().open(engines, stage, version, reform)
        self.version_dir(version).mkdir(parents=True, exist_ok=True)

    def _send(self, bucket: NamedTensors, engines: list[EngineClient]) -> None:
        from safetensors.torch import save_file

        name = f"model-stage{self.receipt.stage:02d}-{self.receipt.buckets:05d}.safetensors"
        path = self.version_dir(self.version) / name
        tmp = path.with_name("." + name + ".tmp")
        save_file({n: t.detach().contiguous().cpu() for n, t in bucket}, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, path)
        self.receipt.files.update({n: name for n, _ in bucket})

    def commit(self, engines, version, receipts) -> dict[str, str]:
        target = self.version_dir(version)
        weight_map = {n: f for r in receipts for n, f in r.files.items()}
        total = sum(r.bytes for r in receipts)
        (target / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
        if self.side_files is not None:
            for f in ("config.json", "generation_config.json"):
                if (self.side_files / f).exists():
                    shutil.copy2(self.side_files / f, target / f)
        failed = self._each(engines, lambda e: e.update_weights_from_disk(str(target), weight_version=version))
        for old in self.root.glob("weights-v*"):  # earlier versions are no longer needed by anyone
            if old != target:
                shutil.rmtree(old, ignore_errors=True)
        return failed


class DistributedTransport(Transport):
    """Broadcast over a group of this pusher (rank 0) and every engine rank.

    A bucket is announced to every engine (names, dtypes, shapes), then broadcast tensor by
    tensor; each engine receives into fresh buffers, checks and loads.  Every member must take
    part in every broadcast, so any failure — an engine refusing an announcement, a broadcast
    timing out — leaves the group unusable: the push fails, the group is torn down, and the
    next push forms a new one (as it does when the engines change or one came back).
    """

    name = "distributed"

    def __init__(self, master_address: str = "127.0.0.1", backend: str = "gloo", engine_tp_size: int = 1,
                 timeout_s: float = 300.0):
        super().__init__()
        self.master_address, self.backend = master_address, backend
        self.engine_tp_size, self.timeout_s = engine_tp_size, timeout_s
        self._group = None
        self._members: list[EngineClient] = []
        self._generation = 0

    def open(self, engines, stage, version, reform: bool = False) -> None:
        super().open(engines, stage, version, reform)
        if reform or self._group is None or [e.url for e in self.engines] != [e.url for e in self._members]:
            self._leave_group()
            self._form_group(stage)

    def _form_group(self, stage: int) -> None:
        """A fresh group of this pusher (rank 0) and every engine rank, on a port the store picks."""

        self._generation += 1
        # Unique across pusher restarts too: an engine may still hold a group of an earlier run.
        name = f"megatron_spin-stage{stage}-g{self._generation}-{secrets.token_hex(4)}"
        world = 1 + self.engine_tp_size * len(self.engines)
        store = host_store(self.master_address, world, self.timeout_s)
        joins = {
            self._pool.submit(e.init_weights_update_group, self.master_address, store.port,
                              1 + i * self.engine_tp_size, world, name, self.backend): e
            for i, e in enumerate(self.engines)
        }
        group = create_update_group(self.master_address, store.port, 0, world, name, self.backend,
                                    self.timeout_s, store=store)
        for fut in cf.as_completed(joins):
            fut.result()  # an engine that could not join: the push fails, nothing half-formed stays
        self._group, self._members = group, list(self.engines)

    def _leave_group(self) -> None:
        """Tell the members of the current group (not the next push's engines) and release it."""
        if self._group is None:
            return
        group, members, self._group, self._members = self._group, self._members, None, []
        name = group.name
        self._each(members, lambda e: e.destroy_weights_update_group(name))
        group.destroy()

    def _send(self, bucket: NamedTensors, engines: list[EngineClient]) -> None:
        if self._group is None:
            raise RuntimeError("the weight-update group broke earlier in this push")
        names = [n for n, _ in bucket]
        dtypes = [str(t.dtype).removeprefix("torch.") for _, t in bucket]
        shapes = [list(t.shape) for _, t in bucket]
        name = self._group.name
        announced = {self._pool.submit(e.update_weights_from_distributed, names, dtypes, shapes, name): e
                     for e in self._members}
        try:
            for _, t in bucket:
                self._group.broadcast(t.detach().to(self._group.device).contiguous(), src=0)
        except RuntimeError as exc:
            # Usually an engine refused the announcement (and so never received): say which.
            done, _ = cf.wait(announced, timeout=5.0)
            refusals = {announced[f].url: str(f.exception()) for f in done if f.exception() is not None}
            self._record(refusals)
            self._broken()
            raise RuntimeError(f"broadcast failed ({exc}); engine replies: {refusals or 'none'}") from None
        failed = {}
        for fut in cf.as_completed(announced):
            try:
                fut.result()
            except EngineError as exc:
                failed[announced[fut].url] = str(exc)
        if failed:
            self._record(failed)
            self._broken()
            raise RuntimeError(f"engines refused a broadcast bucket: {failed}")

    def _broken(self) -> None:
        try:
            self._leave_group()
        except (EngineError, RuntimeError):
            self._group, self._members = None, []

    def shutdown(self) -> None:
        self._broken()
        super().shutdown()


class SharedTransport(Transport):
    """The engine lives in this process and serves the actor's parameters in place (``shared``):
    each bucket re-binds its tensors to the engine (views of the actor's parameters stay shared,
    the rest is copied; :meth:`EmbeddedEngine.share_weights`).  The receipt counts the bytes
    updated, the only ones that moved; the coordinator commits the version over HTTP as usual."""

    name = "shared"

    def __init__(self, engine):
        super().__init__()
        self.engine = engine  # an EmbeddedEngine (rollout.embedded.in_process)

    def _send(self, bucket: NamedTensors, engines: list[EngineClient]) -> int:
        if not engines:
            raise RuntimeError("the shared transport has no engine in this push")
        _, updated = self.engine.share_weights(bucket)
        return updated


class _VersionCommit(Transport):
    name = "commit"

    def _send(self, bucket: NamedTensors, engines: list[EngineClient]) -> None:
        raise RuntimeError("the coordinator's transport only commits")


def make_transport(cfg: SyncConfig, target: PushTarget, address: str = "127.0.0.1") -> Transport:
    """The configured transport for a push to ``target``; ``address``: where this pusher's node is
    reached from the engines (a distributed push hosts its group there)."""
    if cfg.transport in (TransportKind.TENSOR, TransportKind.SHARED):  # the tensors go another way
        return Transport.committing_only()
    if cfg.transport == TransportKind.DISK:
        if not target.disk_dir:
            raise ValueError("the disk transport needs a directory every engine can read (PushTarget.disk_dir)")
        return DiskTransport(target.disk_dir, side_files=target.side_files)
    return DistributedTransport(master_address=address, backend=platform.current().backend,
                                engine_tp_size=target.engine_tp_size, timeout_s=cfg.group_timeout_s)
