"""A fleet of engines: prompts spread over them, failures routed around, weights kept in step.

    fleet = RolloutFleet([EngineClient(url, key) for url in urls])
    samples = fleet.generate(prompts, SamplingParams(n=4, temperature=1.0), return_logprob=True)

Generation splits the prompt list into contiguous shares, one per healthy engine (or sends
everything to an sglang-router, which balances by itself), sends them concurrently and
returns ``[prompt][sample]`` in prompt order.  An engine whose request fails (after the
client's own retries: no reply, 5xx) is dropped and its share is re-sent to the others; only
when no engine is left does generation fail.  A request an engine *refuses* (4xx,
:class:`EngineRequestError`) is the caller's error: it is raised as it is, the engine stays,
and the share is not re-sent (every engine would refuse it).

A dropped engine missed weight pushes, so it is *not* re-added just because it answers
again: :meth:`probe` re-admits it as ``needs_sync``, the next weight push
updates it with the others, and it serves again once its ``weight_version`` matches.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import logging
import threading
from typing import Callable, Optional, Sequence, TypeVar

from megatron_spin.rollout.client import EngineClient, EngineError, EngineRequestError
from megatron_spin.rollout.protocol import Completion, GenerateRequest, SamplingParams

log = logging.getLogger("megatron_spin.fleet")
T = TypeVar("T")


class FleetError(RuntimeError):
    pass


@dataclasses.dataclass
class EngineSlot:
    client: EngineClient
    healthy: bool = True
    needs_sync: bool = False
    failures: int = 0
    last_error: str = ""


class RolloutFleet:
    def __init__(self, engines: Sequence[EngineClient], router: Optional[EngineClient] = None,
                 max_workers: Optional[int] = None):
        if not engines:
            raise FleetError("a rollout fleet needs at least one engine")
        self.slots = [EngineSlot(c) for c in engines]
        self.router = router
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers or max(4, 2 * len(engines)),
                                           thread_name_prefix="fleet")
        self._lock = threading.Lock()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        for s in self.slots:
            s.client.close()

    @property
    def serving(self) -> list[EngineSlot]:
        with self._lock:
            return [s for s in self.slots if s.healthy and not s.needs_sync]

    @property
    def reachable(self) -> list[EngineSlot]:
        """Engines a weight push goes to: serving ones and re-admitted ones waiting for weights."""
        with self._lock:
            return [s for s in self.slots if s.healthy]

    def drop(self, slot: EngineSlot, exc: Exception) -> None:
        with self._lock:
            if slot.healthy:
                log.warning("dropping engine %s: %s", slot.client.url, exc)
            slot.healthy, slot.failures, slot.last_error = False, slot.failures + 1, str(exc)

    # -- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams,
                 return_logprob: bool = True) -> list[list[Completion]]:
        if not prompts:
            return []
        if self.router is not None:
            return self.router.generate(GenerateRequest(tuple(map(tuple, prompts)), sampling, return_logprob))
        results: list[Optional[list[Completion]]] = [None] * len(prompts)
        pending = list(range(len(prompts)))
        while pending:
            engines = self.serving
            if not engines:
                raise FleetError(f"no engine left to generate {len(pending)} prompts; last errors: " +
                                 "; ".join(f"{s.client.url}: {s.last_error}" for s in self.slots))
            shares = _split(pending, len(engines))
            futures = {
                self._pool.submit(slot.client.generate,
                                  GenerateRequest(tuple(tuple(prompts[i]) for i in share), sampling, return_logprob)):
                (slot, share)
                for slot, share in zip(engines, shares) if share
            }
            pending = []
            for fut in cf.as_completed(futures):
                slot, share = futures[fut]
                try:
                    replies = fut.result()
                except EngineRequestError:
                    raise  # the request is wrong (4xx): another engine would refuse it too
                except EngineError as exc:
                    self.drop(slot, exc)
                    pending += share
                    continue
                for i, per_prompt in zip(share, replies):
                    results[i] = [dataclasses.replace(c, prompt_index=i) for c in per_prompt]
            pending.sort()
        return results  # type: ignore[return-value]

    # -- whole-fleet operations -------------------------------------------------------------
    def each(self, fn: Callable[[EngineClient], T], slots: Optional[Sequence[EngineSlot]] = None) -> list[T]:
        """Run ``fn`` on every reachable engine concurrently; any failure raises (naming the engine)."""
        slots = self.reachable if slots is None else list(slots)
        futures = [(s, self._pool.submit(fn, s.client)) for s in slots]
        out, errors = [], []
        for s, fut in futures:
            try:
                out.append(fut.result())
            except EngineError as exc:
                errors.append(f"{s.client.url}: {exc}")
        if errors:
            raise FleetError("; ".join(errors))
        return out

    def each_or_drop(self, fn: Callable[[EngineClient], T], slots: Sequence[EngineSlot]) -> list[T]:
        """Run ``fn`` on ``slots`` concurrently; an engine whose call fails is dropped (see :meth:`probe`)."""
        futures = [(s, self._pool.submit(fn, s.client)) for s in slots]
        out = []
        for s, fut in futures:
            try:
                out.append(fut.result())
            except EngineError as exc:
                self.drop(s, exc)
        return out

    def probe(self) -> list[str]:
        """Re-admit dropped engines whose server answers (they need a weight push to serve).  Not
        ``/health``: on SGLang it generates, and an engine a failed push left paused never passes it."""
        back = []
        for s in self.slots:
            if not s.healthy and s.client.alive():
                with self._lock:
                    s.healthy, s.needs_sync = True, True
                back.append(s.client.url)
                log.info("engine %s is back; it serves after the next weight push", s.client.url)
        return back

    def slot(self, url: str) -> EngineSlot:
        for s in self.slots:
            if s.client.url == url:
                return s
        raise KeyError(f"no engine {url} in the fleet")

    def mark_needs_sync(self, urls: Sequence[str]) -> None:
        """After a failed push: these engines may hold mixed weights and serve nothing until a
        push completes."""
        with self._lock:
            for s in self.slots:
                if s.client.url in urls:
                    s.needs_sync = True

    def mark_synced(self, version: str, urls: Optional[Sequence[str]] = None) -> None:
        """After a complete push (to ``urls``, default all reachable): engines that report
        ``version`` serve again."""
        for s in self.reachable:
            if s.needs_sync and (urls is None or s.client.url in urls):
                try:
                    current = s.client.weight_version()
                except EngineError as exc:
                    self.drop(s, exc)
                    continue
                with self._lock:
                    s.needs_sync = current != version

    def versions(self) -> dict[str, str]:
        return {s.client.url: s.client.weight_version() for s in self.reachable}


def _split(items: list[int], parts: int) -> list[list[int]]:
    """Contiguous, near-equal shares (the first ``len % parts`` shares get one more)."""
    q, r = divmod(len(items), parts)
    out, start = [], 0
    for k in range(parts):
        size = q + (1 if k < r else 0)
        out.append(items[start:start + size])
        start += size
    return out
