"""The per-LUN worker: order, batches, errors, shutdown."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from lunseal.engine.worker import LunWorker, WorkerStopped


@pytest.fixture
def worker() -> Iterator[LunWorker]:
    w = LunWorker("t")
    yield w
    w.stop(timeout=30)


def test_jobs_run_in_submission_order_on_one_thread(worker: LunWorker) -> None:
    seen: list[tuple[int, str]] = []

    def job(i: int) -> Callable[[], None]:
        return lambda: seen.append((i, threading.current_thread().name))

    futures: list[Future[Any]] = [worker.submit(job(i)) for i in range(200)]
    futures += worker.submit_batch([job(i) for i in range(200, 400)])
    for f in futures:
        f.result(timeout=30)
    assert [i for i, _ in seen] == list(range(400))
    assert {name for _, name in seen} == {"lun-t"}


def test_an_error_goes_to_its_future_and_the_worker_carries_on(worker: LunWorker) -> None:
    def boom() -> None:
        raise ValueError("bad")

    failed = worker.submit(boom)
    after = worker.submit(lambda: 42)
    with pytest.raises(ValueError, match="bad"):
        failed.result(timeout=30)
    assert after.result(timeout=30) == 42


def test_call_from_the_worker_itself_does_not_deadlock(worker: LunWorker) -> None:
    assert worker.call(lambda: worker.call(lambda: 7) + 1) == 8
    assert worker.submit(lambda: worker.on_worker).result(timeout=30)
    assert not worker.on_worker


def test_stop_drains_what_was_queued_then_refuses() -> None:
    w = LunWorker("s")
    gate = threading.Event()
    first = w.submit(lambda: gate.wait(30))
    rest = [w.submit(functools.partial(int, i)) for i in range(50)]
    gate.set()
    w.stop(timeout=30)
    assert first.result(timeout=0) is True
    assert [f.result(timeout=0) for f in rest] == list(range(50))
    with pytest.raises(WorkerStopped):
        w.submit(lambda: None)
    with pytest.raises(WorkerStopped):
        w.submit_batch([lambda: None])
