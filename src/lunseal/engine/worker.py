"""One ordered worker thread per LUN (the seed's per-LUN ``IOHandler``).

Everything that touches a LUN's data or state runs on its worker, in the order
it was submitted: host I/O, the durable dirty mark, FUA and FLUSH, checkpoints,
token and hold operations, mirror copy steps.  So one LUN's flush or slow disk
never stalls another LUN, and a LUN's own operations never race each other.

The event loop hands work over in batches (:meth:`LunWorker.submit_batch`: a
whole receive's worth of requests per wake-up) so that page-cache-resident
workloads pay the thread hop once per batch, not once per request.  The blocking
calls a worker makes (pread, pwrite, fdatasync, fallocate, SQLite commits)
release the GIL, so workers of different LUNs overlap.

Results come back as :class:`concurrent.futures.Future` objects (front ends on
an event loop wrap them with :func:`asyncio.wrap_future`), or not at all with
:meth:`LunWorker.post`: the NBD data path posts one job per receive that hands
its replies back with one ``call_soon_threadsafe`` itself, and skips the cost
of a Future (a lock and a condition each) per request.

The queue is a :class:`queue.SimpleQueue` (implemented in C): a hand-off costs
one put and, when the worker is idle, one wake-up.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

from lunseal.errors import Conflict

log = logging.getLogger(__name__)

T = TypeVar("T")

#: A job, and the future for its result (None: posted, nobody waits).
_Job = tuple[Callable[[], Any], "Future[Any] | None"]
_STOP: _Job = (lambda: None, None)


class WorkerStopped(Conflict):
    code = "worker_stopped"


class LunWorker:
    """A thread that runs submitted callables one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        #: Held while queueing, so nothing lands behind the stop marker.
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"lun-{name}", daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------------

    def _put(self, job: _Job) -> None:
        with self._lock:
            if self._stopping:
                raise WorkerStopped(f"LUN {self.name} is shutting down")
            self._jobs.put(job)

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        self._put((fn, future))
        return future

    def post(self, fn: Callable[[], object]) -> None:
        """Queue ``fn`` without a future: it must deal with its own errors
        (one that escapes is logged and the worker carries on)."""
        self._put((fn, None))

    def submit_batch(self, fns: Iterable[Callable[[], Any]]) -> list[Future[Any]]:
        """Queue several jobs at once; they run in the given order, back to back."""
        jobs: list[_Job] = [(fn, Future()) for fn in fns]
        with self._lock:
            if self._stopping:
                raise WorkerStopped(f"LUN {self.name} is shutting down")
            for job in jobs:
                self._jobs.put(job)
        return [future for _, future in jobs if future is not None]

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the worker and wait for it (from any thread but the worker's)."""
        if threading.current_thread() is self._thread:
            return fn()  # already in order: waiting on ourselves would deadlock
        return self.submit(fn).result()

    @property
    def on_worker(self) -> bool:
        return threading.current_thread() is self._thread

    # -- running ----------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is _STOP:
                return  # everything queued before it has run
            fn, future = job
            if future is None:
                try:
                    fn()
                except BaseException:
                    log.exception("LUN %s: a posted job failed", self.name)
                continue
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn()
            except BaseException as exc:  # handed to whoever waits for it
                future.set_exception(exc)
            else:
                future.set_result(result)

    def stop(self, timeout: float | None = None) -> None:
        """Finish what was queued, then end the thread (idempotent)."""
        with self._lock:
            if not self._stopping:
                self._stopping = True
                self._jobs.put(_STOP)
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
