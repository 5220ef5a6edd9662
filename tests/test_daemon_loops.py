"""The daemon's background loops outlive any failure and recover (real Array,
real SQLite, a real kernel file-size limit making the catalog unwritable)."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from lunseal.daemon import Retry, _checkpoint_loop
from lunseal.engine.array import Array
from tests.engine.state.test_state_trust import catalog_full

MiB = 1 << 20


async def _until(predicate: object, what: str, rounds: int = 2000) -> None:
    """Yield to the loop until ``predicate()`` holds (bounded by count, not time)."""
    assert callable(predicate)
    for _ in range(rounds):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_the_checkpoint_loop_survives_a_failing_catalog_and_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lunseal.daemon")
    arr = Array.open(tmp_path / "data")
    try:
        arr.create_lun("a", MiB)
        tracker = arr.tracker("a")
        tracker.acquire("backup")

        async def scenario() -> None:
            arr.lun("a").write(0, b"x")
            loop_task = asyncio.create_task(_checkpoint_loop(arr, 0.0))
            try:
                with catalog_full(arr):
                    await _until(lambda: "checkpoint failed" in caplog.text, "a failure")
                    await asyncio.sleep(0.3)  # several more rounds fail meanwhile
                    assert tracker.dirty
                    assert not loop_task.done()
                await _until(lambda: not tracker.dirty, "the LUN to be recorded clean")
                assert "checkpoint works again" in caplog.text
            finally:
                loop_task.cancel()

        asyncio.run(scenario())
        assert caplog.text.count("checkpoint failed") == 1  # once per kind, not per round
    finally:
        arr.close()


def test_retry_backs_off_and_logs_each_kind_once(caplog: pytest.LogCaptureFixture) -> None:
    retry = Retry("copy", first=0.5, most=4.0)
    delays = [retry.failed(OSError(f"disk full at {i}")) for i in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    retry.failed(ValueError("other"))
    assert caplog.text.count("copy failed") == 2
    retry.succeeded()
    assert retry.failed(OSError("disk full")) == 0.5
