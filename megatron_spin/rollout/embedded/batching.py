"""Continuous collection of concurrent requests into generation batches, one batch at a time.

HTTP handlers run in a thread pool; each submits its jobs and waits on a future.  One worker
thread owns the model: it takes *everything* queued when it becomes free (up to
``max_jobs``), runs one batched generation, and resolves the futures.  So N clients sending
at once share one forward pass per token instead of N.

Weight updates run *on the worker thread* between batches (:meth:`BatchingWorker.call`), so a
batch never sees two versions of the weights and every output of a batch is labelled with the
version it was generated with.  On the thread, because on the CPU each thread that computes in
parallel keeps an OpenMP pool of its own, and GNU OpenMP throttles its threads' spin-waiting to
~100 spins once a process holds more of them than there are cores: a second pool (the weight
copy on an HTTP thread; in the trainer rank, the training thread) made every later decode step
wake its threads through the kernel, ~35 % slower sampling here (2.9 → 4.0 s for the
``benchmarks/vs_trl.py`` workload).  :meth:`BatchingWorker.exclusive` still holds batches back
for state changes without tensor work.  ``pause`` stops new batches (queued requests wait)
until ``resume``; calls run while paused.

A caller that gives up cancels its future (the HTTP handler does when its client hangs up): a
queued request is then never taken, and during a batch :meth:`BatchingWorker.abandoned` tells
``run_batch`` which of its jobs nobody waits for any more, so it can stop them.

A request may come with a ``listener`` (a streaming reply): ``run_batch`` reports each token
through :meth:`BatchingWorker.heard`, which passes it on as ``listener(job_in_request, token)``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Callable, Generic, Optional, Sequence, TypeVar

Job = TypeVar("Job")
Out = TypeVar("Out")
Listener = Callable[[int, int], None]  # (job index within its request, token)

log = logging.getLogger(__name__)


class WorkerStopped(RuntimeError):
    pass


class BatchingWorker(Generic[Job, Out]):
    def __init__(self, run_batch: Callable[[Sequence[Job]], tuple[list[Out], object]], max_jobs: int = 256):
        """``run_batch(jobs) -> (outputs, tag)``: ``tag`` (the weight version) is returned
        with each request's outputs."""
        self._run_batch = run_batch
        self._max_jobs = max_jobs
        self._cond = threading.Condition()
        self._queue: list[tuple[list[Job], Future, Optional[Listener]]] = []
        self._paused = False
        self._exclusive = 0  # holders of exclusive(): no batch may start
        self._running = False
        self._stopped = False
        self._calls: list[tuple[Callable[[], object], Future]] = []  # run on the worker thread before batches
        self._owners: list[Future] = []  # the running batch's futures, one per job
        self._listeners: list[tuple[Optional[Listener], int]] = []  # per job: its request's listener, its index there
        self.batches_run = 0
        self._thread = threading.Thread(target=self._loop, name="embedded-engine-batcher", daemon=True)
        self._thread.start()

    def submit(self, jobs: Sequence[Job], listener: Optional[Listener] = None) -> Future:
        fut: Future = Future()
        with self._cond:
            if self._stopped:
                raise WorkerStopped("the engine is shutting down")
            self._queue.append((list(jobs), fut, listener))
            self._cond.notify_all()
        return fut

    def pause(self) -> None:
        with self._cond:
            self._paused = True

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def abandoned(self, job: int) -> bool:
        """Whether job ``job`` of the running batch belongs to a request its caller cancelled
        (for ``run_batch``, on the worker thread, while the batch runs)."""
        return self._owners[job].cancelled()

    def heard(self, job: int, token: int) -> None:
        """Job ``job`` of the running batch chose ``token``: tell its request's listener, if any
        (for ``run_batch``; a failing listener is logged, never fails the batch)."""
        listener, index = self._listeners[job]
        if listener is not None and not self._owners[job].cancelled():
            try:
                listener(index, token)
            except Exception:  # e.g. the server's event loop closed under a shutdown
                log.exception("a token listener failed")

    @contextlib.contextmanager
    def exclusive(self):
        """No batch runs inside this block (waits for the running one to finish)."""
        with self._cond:
            self._exclusive += 1
            while self._running:
                self._cond.wait()
        try:
            yield
        finally:
            with self._cond:
                self._exclusive -= 1
                self._cond.notify_all()

    def call(self, fn: Callable[[], Out]) -> Out:
        """``fn()`` on the worker thread, between batches (before any queued batch, also while
        paused); its result, or what it raised.  From the worker thread itself it runs at once."""
        if threading.current_thread() is self._thread:
            return fn()
        fut: Future = Future()
        with self._cond:
            if self._stopped:
                raise WorkerStopped("the engine is shutting down")
            self._calls.append((fn, fut))
            self._cond.notify_all()
        return fut.result()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            pending, self._queue = self._queue, []
            calls, self._calls = self._calls, []
            self._cond.notify_all()
        for _, fut, _ in pending:
            fut.set_exception(WorkerStopped("the engine is shutting down"))
        for _, fut in calls:
            fut.set_exception(WorkerStopped("the engine is shutting down"))
        self._thread.join(timeout=30)

    def _take(self) -> list[tuple[list[Job], Future, Optional[Listener]]]:
        """Requests for the next batch: whole requests, at least one, about ``max_jobs`` jobs.
        Requests their callers cancelled while they waited are dropped here."""
        self._queue = [req for req in self._queue if not req[1].cancelled()]
        taken, count = [], 0
        while self._queue and (not taken or count + len(self._queue[0][0]) <= self._max_jobs):
            req = self._queue.pop(0)
            taken.append(req)
            count += len(req[0])
        return taken

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped and not self._calls and (not self._queue or self._paused or self._exclusive):
                    self._cond.wait()
                if self._stopped:
                    return
                call = self._calls.pop(0) if self._calls else None
                if call is None:
                    taken = self._take()
                    if not taken:  # every queued request was cancelled
                        continue
                    self._running = True
            if call is not None:
                fn, fut = call
                try:
                    result = fn()
                except BaseException as exc:  # the caller's to handle
                    _resolve(fut, exception=exc)
                else:
                    _resolve(fut, result=result)
                continue
            self._owners = [fut for req, fut, _ in taken for _ in req]
            self._listeners = [(listener, i) for req, _, listener in taken for i in range(len(req))]
            try:
                jobs = [j for req, _, _ in taken for j in req]
                outputs, tag = self._run_batch(jobs)
                start = 0
                for req, fut, _ in taken:
                    _resolve(fut, result=(outputs[start:start + len(req)], tag))
                    start += len(req)
                self.batches_run += 1
            except BaseException as exc:  # a failed batch fails its requests, not the engine
                for _, fut, _ in taken:
                    _resolve(fut, exception=exc)
            finally:
                self._owners = []
                self._listeners = []
                with self._cond:
                    self._running = False
                    self._cond.notify_all()


def _resolve(fut: Future, result=None, exception: BaseException | None = None) -> None:
    """Settle ``fut`` unless its caller cancelled it (even between a check and the set): a caller
    that gave up must not fail the others of its batch."""
    try:
        if exception is not None:
            fut.set_exception(exception)
        else:
            fut.set_result(result)
    except InvalidStateError:
        pass
