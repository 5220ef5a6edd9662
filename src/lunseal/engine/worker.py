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

Results come back as :class:`concurrent.futures.Future` objects; front ends on
an event loop wrap them with :func:`asyncio.wrap_future` or deliver a batch's
replies with one ``call_soon_threadsafe``.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import Any, TypeVar

from lunseal.errors import Conflict

log = logging.getLogger(__name__)

T = TypeVar("T")

_Job = tuple[Callable[[], Any], "Future[Any]"]


class WorkerStopped(Conflict):
    code = "worker_stopped"


class LunWorker:
    """A thread that runs submitted callables one at a time, in order."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: deque[_Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"lun-{name}", daemon=True)
        self._thread.start()

    # -- submitting -------------------------------------------------------------

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        future: Future[T] = Future()
        with self._cond:
            if self._stopping:
                raise WorkerStopped(f"LUN {self.name} is shutting down")
            self._jobs.append((fn, future))
            self._cond.notify()
        return future

    def submit_batch(self, fns: Iterable[Callable[[], Any]]) -> list[Future[Any]]:
        """Queue several jobs with one wake-up; they run in the given order."""
        jobs: list[_Job] = [(fn, Future()) for fn in fns]
        with self._cond:
            if self._stopping:
                raise WorkerStopped(f"LUN {self.name} is shutting down")
            self._jobs.extend(jobs)
            self._cond.notify()
        return [future for _, future in jobs]

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
            with self._cond:
                while not self._jobs and not self._stopping:
                    self._cond.wait()
                if not self._jobs:
                    return  # stopping and drained
                batch = list(self._jobs)
                self._jobs.clear()
            for fn, future in batch:
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
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout)
