"""The daemon's background work (mirror copy steps, checkpoints) runs on the
LUNs' workers, never on the event loop: while a step or a checkpoint is stuck
inside one LUN's disk, a real NBD client still reads another LUN.

Deterministic: the stuck call waits for an event the test sets only after the
read came back (or, on a loop that ran the call itself, after a timeout, which
the test then reports as the read having waited for it)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from lunseal import daemon
from lunseal.engine.array import Array
from lunseal.engine.backends.base import Backend
from lunseal.engine.backends.layers import Layer
from lunseal.engine.lun import Lun
from lunseal.engine.mirror.mirror import SYNCED
from lunseal.frontends.nbd.server import NbdServer
from tests.engine.mirror.test_mirror import MiB, assert_identical, data, drive, filled, synced_pair
from tests.support.arrays import Arrays
from tests.support.nbdclient import NbdClient

STUCK_FOR = 5.0  # only reached when the loop itself runs the stuck call (the bug)


class Stuck(Layer):
    """The first read (or flush) waits until released, as a hung disk would."""

    def __init__(self, inner: Backend, what: str) -> None:
        super().__init__(inner)
        self.what = what
        self.entered = threading.Event()
        self.release = threading.Event()
        self.stuck = False

    def _maybe_stick(self) -> None:
        if not self.entered.is_set():
            self.stuck = True
            self.entered.set()
            self.release.wait(STUCK_FOR)
            self.stuck = False

    def read(self, offset: int, length: int) -> bytes:
        if self.what == "read":
            self._maybe_stick()
        return super().read(offset, length)

    def flush(self) -> None:
        if self.what == "flush":
            self._maybe_stick()
        super().flush()


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


@pytest.fixture
def array(arrays: Arrays) -> Iterator[Array]:
    array = arrays.open()
    yield array
    for lun in array.luns():
        if lun.worker is not None:
            lun.worker.stop(30)


def give_workers(array: Array) -> None:
    """The array gives every available LUN its worker; make sure it did."""
    assert all(lun.worker is not None for lun in array.luns())


def read_other_while_stuck(
    array: Array,
    sock: Path,
    stuck: Stuck,
    background: Callable[[], Coroutine[Any, Any, None]],
    start: Callable[[], None],
) -> None:
    """Start ``background`` and ``start`` the work that gets stuck; once it is,
    read LUN ``other`` over NBD and check the read came back while it was stuck."""
    other = array.lun("other")

    def nbd_read() -> tuple[bytes, bool]:
        with NbdClient.connect(str(sock)) as client:
            client.connect_export("other")
            reply = client.read(0, 4096)
        return reply.data, stuck.stuck

    async def scenario() -> None:
        server = NbdServer(array)
        await server.listen_unix(sock)
        task = asyncio.create_task(background())
        try:
            start()
            assert await asyncio.to_thread(stuck.entered.wait, 30)
            got, still_stuck = await asyncio.wait_for(asyncio.to_thread(nbd_read), 60)
            assert got == other.read(0, 4096)
            assert still_stuck, "the NBD read waited for the stuck background work"
        finally:
            stuck.release.set()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.close()

    asyncio.run(scenario())


def test_a_stuck_copy_step_does_not_stop_nbd_reads_of_another_lun(
    array: Array, tmp_path: Path
) -> None:
    src = filled(array, "src", seed=1)
    filled(array, "other", seed=2)
    dst = array.create_lun("dst", src.size)
    stuck = src.push_layer(lambda inner: Stuck(inner, "read"))
    give_workers(array)
    mirror = None

    def create() -> None:
        nonlocal mirror
        mirror = array.mirrors.create(src, dst)

    async def copier_until_synced() -> None:
        await daemon._mirror_copy_loop(array)

    read_other_while_stuck(array, tmp_path / "nbd.sock", stuck, copier_until_synced, create)
    assert mirror is not None
    m = mirror
    # Released, the copy goes on to the end on the source's worker.
    asyncio.run(drive_in_background(array, lambda: m.state == SYNCED))
    assert_identical(src, dst)


async def drive_in_background(array: Array, done: Callable[[], bool]) -> None:
    task = asyncio.create_task(daemon._mirror_copy_loop(array))
    try:
        for _ in range(6000):  # bounded by count; each round yields for 10 ms
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the copy did not finish")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def test_a_stuck_checkpoint_flush_does_not_stop_nbd_reads_of_another_lun(
    array: Array, tmp_path: Path
) -> None:
    busy = filled(array, "busy", seed=3)
    filled(array, "other", seed=4)
    array.checkpoint(0.0)  # both clean: only a new write makes a checkpoint due
    stuck = busy.push_layer(lambda inner: Stuck(inner, "flush"))
    give_workers(array)

    async def checkpoints() -> None:
        await daemon._checkpoint_loop(array, 0.0)

    def write() -> None:
        busy.write(0, data(4096, 5))

    read_other_while_stuck(array, tmp_path / "nbd.sock", stuck, checkpoints, write)


def test_a_host_write_to_a_split_target_racing_a_resync_is_copied_over(array: Array) -> None:
    """With per-LUN workers, a host's write to a split rw target (target's worker)
    can pass the target's guard just before a resync starts (source's worker):
    the resync must still make the target equal to the source there."""
    m = synced_pair(array)
    m.split("rw")
    entered, release = threading.Event(), threading.Event()

    def hold_once(lun: object, offset: int, length: int) -> None:
        if not entered.is_set():  # after the guard, before the mirror hears of it
            entered.set()
            assert release.wait(30)

    m.target.listeners.insert(0, hold_once)
    writer = threading.Thread(target=lambda: m.target.write(5 * MiB, data(4096, 7)))
    writer.start()
    try:
        assert entered.wait(30)
        m.resync()
    finally:
        release.set()
        writer.join(30)
    assert not writer.is_alive()
    drive(array)
    assert m.state == SYNCED
    assert_identical(m.source, m.target)


def test_a_mirror_targets_checkpoint_runs_on_the_worker_that_writes_it(
    array: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A synced target is written by its source's worker (fan-out): its checkpoint
    must run there too, or it could record the target clean while a write lands.
    Once split, hosts write it on its own worker, and its checkpoint follows."""
    m = synced_pair(array)
    give_workers(array)
    seen: dict[str, str] = {}

    def record(idle: float, lun: Lun | None = None) -> None:
        assert lun is not None
        seen[lun.name] = threading.current_thread().name

    monkeypatch.setattr(array, "checkpoint", record)

    async def one_round() -> None:
        seen.clear()
        task = asyncio.create_task(daemon._checkpoint_loop(array, 0.0))
        try:
            for _ in range(3000):  # bounded by count
                if len(seen) == 2:
                    return
                await asyncio.sleep(0.01)
            raise AssertionError("no checkpoint round")
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    asyncio.run(one_round())
    assert seen == {"src": "lun-src", "dst": "lun-src"}
    m.split("rw")
    asyncio.run(one_round())
    assert seen == {"src": "lun-src", "dst": "lun-dst"}
