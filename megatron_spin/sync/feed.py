"""The tensor push by device locality: every engine TP rank is fed from memory on its own device.

Every *feeder* rank (:class:`~megatron_spin.sync.routing.FeedRoute`) holds the full HF tensors
of the whole model, one parameter at a time (:func:`~megatron_spin.sync.gather.iter_full_hf_weights`:
TP all-gather on the owning stage — for a MoE expert first a broadcast from each EP rank, so
every expert of the layer comes by —, then a broadcast along the pipeline), buckets them into one
flat buffer on its device, and encodes a handle to it for each engine TP rank it feeds.  The
feeders of one engine gather their handles to the engine's leader (its TP rank 0's feeder),
which sends ``/update_weights_from_tensor`` with one payload per TP rank, in TP order; the
leader's outcome is broadcast back, so every feeder keeps its buffer alive until the engine
has read it and all agree which engines failed.  Every feeder runs every collective of every
bucket whatever failed (a skipped gather would hang its peers); a failed engine just gets no
more requests.

On CPU ranks the buffers are shared memory and the devices simulated (``cpu:<rank>``): the
embedded engine refuses a payload from a device it does not hold, as SGLang refuses a CUDA
handle from a GPU it cannot see.
"""

from __future__ import annotations

import datetime
from typing import Callable, Iterable, Optional

import torch
import torch.distributed as dist

from megatron_spin.rollout.client import EngineClient, EngineError
from megatron_spin.sync.routing import FeedRoute
from megatron_spin.sync.transports import Receipt
from megatron_spin.wire.bucket import NamedTensors, bucketed, flat_layout, flatten, nbytes
from megatron_spin.wire.tensor_payload import FLATTENED_BUCKET, encode_named_tensors


class ColocatedFeed:
    """One rank's part of a tensor push by locality.  Built on every trainer rank, in the same
    order (it creates one gloo group per engine with several feeders: a collective)."""

    def __init__(self, route: FeedRoute, rank: int, engine_tp_size: int, load_format: Optional[str],
                 client: Callable[[str], EngineClient], timeout_s: float = 300.0):
        """``client``: the engine client of a URL (the sender's, which owns and closes them);
        ``timeout_s``: how long a feeder waits in its engine group for a peer (a hung peer or
        engine fails the push after this instead of the run's collective timeout)."""
        self.route, self.rank, self.tp = route, rank, engine_tp_size
        self.load_format, self.client = load_format, client
        self.feeds = route.feeds(rank)  # [(engine, engine TP rank)]
        self.device = route.device_of(rank)
        self._groups: dict[int, object] = {}
        for e, feeders in enumerate(route.feeders):
            ranks = sorted(set(feeders))
            if len(ranks) > 1:
                # collective: every rank creates every group
                group = dist.new_group(ranks, backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
                if rank in ranks:
                    self._groups[e] = group
        self._staging: Optional[torch.Tensor] = None

    @property
    def is_feeder(self) -> bool:
        return bool(self.feeds)

    def push(self, stream: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
             urls: dict[int, str]) -> Optional[Receipt]:
        """Send ``stream`` (every HF tensor, on a feeder) to the engines of ``urls`` (engine index ->
        URL: this push's engines).  Returns the receipt of the engines this rank leads, if any."""
        engines = sorted({e for e, _ in self.feeds if e in urls})
        led = [e for e in engines if self.route.leader(e) == self.rank]
        receipt = Receipt(stage=self.rank, engines=[urls[e] for e in led]) if led else None
        failed: dict[int, str] = {}
        for bucket in bucketed(stream, bucket_bytes):
            # A local failure (shared memory exhausted, a payload that does not pickle) fails this
            # rank's engines but never its part in the collectives: peers wait in them otherwise.
            try:
                flat, entries = flatten(bucket, shared=True, out=self._staging_buffer(bucket))
                local_error = None
            except (RuntimeError, OSError, ValueError) as exc:
                flat = entries = None
                local_error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
            for e in engines:
                failed_e = self._feed_bucket(e, bucket, flat, entries, urls[e], failed.get(e), local_error)
                if failed_e and e not in failed:
                    failed[e] = failed_e
            if receipt is not None:
                receipt.names += [n for n, _ in bucket]
                receipt.bytes += sum(nbytes(t) for _, t in bucket)
                receipt.buckets += 1
            del flat  # the engines have read it (the leader's outcome came back after their reply)
        if receipt is not None:
            receipt.failed = {urls[e]: msg for e, msg in failed.items() if e in led}
        return receipt

    def _staging_buffer(self, bucket: NamedTensors) -> Optional[torch.Tensor]:
        """CPU: one shared-memory buffer reused for every bucket (fresh shared memory costs a page
        fault per 4 KiB); GPU: a fresh buffer each time (torch keeps an IPC-shared block alive until
        the engine lets go of it, and ``ipc_collect`` reclaims it after the push)."""
        if not bucket or bucket[0][1].device.type != "cpu":
            return None
        _, total = flat_layout(bucket)
        if self._staging is None or self._staging.numel() < total:
            self._staging = None
            self._staging = torch.empty(total, dtype=torch.uint8).share_memory_()
        return self._staging

    def _feed_bucket(self, engine: int, bucket, flat, entries, url: str, already_failed: Optional[str],
                     local_error: Optional[str]) -> Optional[str]:
        """This rank's payloads for ``engine`` to its leader; the leader sends; the outcome comes back.

        Nothing is encoded for an engine that already failed (every feeder knows: the outcome was
        broadcast): an encoded handle nobody opens would pin its buffer for the rest of the run."""
        mine: dict = {}
        if already_failed is None and local_error is None:
            try:
                mine = self._encode(engine, bucket, flat, entries)
            except Exception as exc:  # noqa: BLE001 - whatever the pickler raises, peers must not wait
                local_error = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        if local_error is not None:
            mine = {"error": local_error}
        group = self._groups.get(engine)
        leader = self.route.leader(engine)
        if group is None:
            gathered = [mine]
        else:
            gathered = [None] * dist.get_world_size(group) if self.rank == leader else None
            dist.gather_object(mine, gathered, dst=leader, group=group)
        outcome: list = [already_failed]
        if self.rank == leader and already_failed is None:
            errors = [part["error"] for part in gathered if "error" in part]
            payloads = {k: v for part in gathered for k, v in part.items() if k != "error"}
            try:
                if errors:
                    raise RuntimeError("; ".join(errors))
                missing = [k for k in range(self.tp) if k not in payloads]
                if missing:
                    raise RuntimeError(f"no feeder for engine TP ranks {missing}")
                self.client(url).update_weights_from_tensor([payloads[k] for k in range(self.tp)], self.load_format)
            except (EngineError, OSError, RuntimeError, ValueError) as exc:
                outcome[0] = str(exc)
        if group is not None:
            dist.broadcast_object_list(outcome, src=leader, group=group)
        return outcome[0]

    def _encode(self, engine: int, bucket, flat, entries) -> dict:
        """One payload per engine TP rank this rank feeds; one pickle each, so each receiving rank
        takes its own reference on the shared memory."""
        mine = {}
        for e, k in self.feeds:
            if e != engine:
                continue
            if self.load_format == FLATTENED_BUCKET:
                mine[k] = encode_named_tensors(bucket, FLATTENED_BUCKET, (flat, entries), device=self.device)
            else:
                mine[k] = encode_named_tensors([(n, t.clone() if t.device.type == "cpu" else t) for n, t in bucket],
                                               None, device=self.device)
        return mine
