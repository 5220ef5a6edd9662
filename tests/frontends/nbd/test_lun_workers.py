"""Per-LUN workers on the NBD data path, over real sockets.

An in-process NbdServer on a uvloop loop in a thread, two file-backed LUNs.
A "slow disk" is a backend call that waits on an event the test sets: the
only way to make a stall deterministic without depending on machine speed.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import uvloop

from lunseal.engine.array import Array
from lunseal.engine.backends.base import Backend
from lunseal.engine.lun import Lun
from lunseal.frontends.api.app import DaemonContext, create_app
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.server import NbdServer
from tests.support.nbdclient import NbdClient

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20
#: Generous: only a server that never answers gets near it.
TIMEOUT = 20.0


def pattern(seed: int, length: int) -> bytes:
    block = bytes((seed * 131 + i * 7 + 1) % 251 + 1 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


@dataclass
class Served:
    array: Array
    server: NbdServer
    loop: asyncio.AbstractEventLoop
    tcp: tuple[str, int]

    def client(self, export: str, *, timeout: float = TIMEOUT) -> NbdClient:
        client = NbdClient.connect(self.tcp, timeout=timeout)
        client.connect_export(export)
        return client


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    array = Array.open(tmp_path / "home")
    array.create_lun("a", 32 * MiB)
    array.create_lun("b", 32 * MiB)
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbd-test-loop", daemon=True)
    thread.start()
    server = NbdServer(array)
    try:
        tcp = on_loop(loop, server.listen_tcp("127.0.0.1", 0))
        yield Served(array, server, loop, tcp)
    finally:
        on_loop(loop, server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        array.close()


def backend_of(lun: Lun) -> Backend:
    return lun._backend


def stall(lun: Lun, method: str) -> tuple[threading.Event, threading.Event]:
    """Make the LUN's backend ``method`` wait until the returned ``release`` is
    set; ``entered`` is set once a call is waiting (a disk that hangs)."""
    backend = backend_of(lun)
    real: Callable[..., Any] = getattr(backend, method)
    entered, release = threading.Event(), threading.Event()

    def slow(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        assert release.wait(60), "the test never released the stalled call"
        return real(*args, **kwargs)

    setattr(backend, method, slow)
    return entered, release


def test_a_stalled_flush_on_one_lun_does_not_stop_another_luns_io(served: Served) -> None:
    """A hanging fdatasync on LUN B: hosts of LUN A are served meanwhile (they
    were not when B's requests ran on the event loop)."""
    entered, release = stall(served.array.lun("b"), "flush")
    try:
        with served.client("b") as b, served.client("a", timeout=5.0) as a:
            cookie = b.send_request(c.CMD_FLUSH)
            assert entered.wait(TIMEOUT)
            for i in range(50):
                data = pattern(i, 4 * KiB)
                assert a.write(i * 4 * KiB, data) == 0
                assert a.read(i * 4 * KiB, 4 * KiB).data == data
            assert a.request(c.CMD_FLUSH).error == 0
            assert not release.is_set()  # B's flush is still hanging the whole time
            release.set()
            reply = b.read_reply()
            assert (reply.cookie, reply.error) == (cookie, 0)
    finally:
        release.set()


def test_pipelined_writes_survive_the_receive_buffer_being_reused(served: Served) -> None:
    """The worker owns a write's payload: while it is stalled, the loop keeps
    receiving (and reusing its buffer for) many more writes; each lands intact."""
    lun = served.array.lun("a")
    entered, release = stall(lun, "write")
    size, count = 48 * KiB, 160  # 7.5 MiB in flight: under the reply queue cap
    try:
        with served.client("a") as client:
            sent = [
                client.pack_request(c.CMD_WRITE, i * size, payload=pattern(i, size))
                for i in range(count)
            ]
            # Several sends: each receive refills (and compacts) the codec's buffer.
            for start in range(0, count, 8):
                client.send(b"".join(raw for _, raw in sent[start : start + 8]))
            assert entered.wait(TIMEOUT)
            release.set()
            replies = [client.read_reply() for _ in range(count)]
            assert sorted(r.cookie for r in replies) == sorted(cookie for cookie, _ in sent)
            assert all(r.error == 0 for r in replies)
            for i in range(count):
                assert client.read(i * size, size).data == pattern(i, size), f"write {i}"
    finally:
        release.set()


def test_flush_on_one_connection_covers_writes_completed_on_another(served: Served) -> None:
    """MULTI_CONN: every write of a LUN runs on its one worker, so a FLUSH
    received after a write's reply runs after that write: the backend sees the
    calls in that order."""
    lun = served.array.lun("a")
    backend = backend_of(lun)
    calls: list[str] = []
    real_write, real_flush = backend.write, backend.flush

    def write(offset: int, data: bytes | bytearray | memoryview) -> None:
        calls.append(f"write {offset}")
        real_write(offset, data)

    def flush() -> None:
        calls.append("flush")
        real_flush()

    backend.write = write  # type: ignore[method-assign]
    backend.flush = flush  # type: ignore[method-assign]
    with served.client("a") as w1, served.client("a") as w2, served.client("a") as f:
        for i in range(20):
            assert w1.write(i * MiB, pattern(i, 64 * KiB)) == 0
            assert w2.write(i * MiB + 512 * KiB, pattern(i + 50, 64 * KiB)) == 0
            assert f.request(c.CMD_FLUSH).error == 0
            assert calls[-3:] == [f"write {i * MiB}", f"write {i * MiB + 512 * KiB}", "flush"]


def test_requests_run_on_the_luns_worker_thread(served: Served) -> None:
    seen: list[str] = []
    lun = served.array.lun("a")
    backend = backend_of(lun)
    real_write = backend.write

    def write(offset: int, data: bytes | bytearray | memoryview) -> None:
        seen.append(threading.current_thread().name)
        real_write(offset, data)

    backend.write = write  # type: ignore[method-assign]
    with served.client("a") as client:
        assert client.write(0, pattern(1, 4 * KiB)) == 0
    assert seen == ["lun-a"]


def test_a_write_payload_reaches_the_backend_without_a_copy(served: Served) -> None:
    """The worker writes the payload from the connection's receive buffer (a
    bytearray the codec lent), not from a copy made on the event loop."""
    seen: list[object] = []
    backend = backend_of(served.array.lun("a"))
    real_write = backend.write

    def write(offset: int, data: bytes | bytearray | memoryview) -> None:
        seen.append(data.obj if isinstance(data, memoryview) else data)
        real_write(offset, data)

    backend.write = write  # type: ignore[method-assign]
    with served.client("a") as client:
        for i in range(4):
            assert client.write(i * 64 * KiB, pattern(i, 64 * KiB)) == 0
        for i in range(4):
            assert client.read(i * 64 * KiB, 64 * KiB).data == pattern(i, 64 * KiB)
    assert len(seen) == 4
    assert all(isinstance(obj, bytearray) and len(obj) > 64 * KiB for obj in seen), [
        type(obj) for obj in seen
    ]


class BatchCounter:
    """A batch hook: counts the batches the LUN ran."""

    def __init__(self) -> None:
        self.batches = 0

    def begin_batch(self) -> None:
        self.batches += 1

    def end_batch(self) -> None:
        pass


def test_requests_received_while_the_worker_is_busy_join_its_next_job(served: Served) -> None:
    """Receives that arrive while the worker has not started the connection's
    last job are added to that job: the worker pays its per-batch costs (a
    wake-up, two stamps, one reply hand-off) once for all of them, in order."""
    lun = served.array.lun("a")
    assert lun.worker is not None
    counter = BatchCounter()
    lun.batch_hooks.append(counter)
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        assert release.wait(60)

    size, count = 4 * KiB, 6
    try:
        with served.client("a") as client:
            lun.worker.post(hold)
            assert busy.wait(TIMEOUT)
            (conn,) = served.server.connections
            for i in range(count):  # one receive each: the server has parsed it before the next
                client.send(client.pack_request(c.CMD_WRITE, i * size, payload=pattern(i, size))[1])
                for _ in range(2000):
                    if conn._inflight_bytes == (i + 1) * size:
                        break
                    threading.Event().wait(0.01)
                assert conn._inflight_bytes == (i + 1) * size
            release.set()
            replies = [client.read_reply() for _ in range(count)]
            assert all(r.error == 0 for r in replies)
            assert counter.batches == 1  # one batch ran all six writes
            for i in range(count):
                assert client.read(i * size, size).data == pattern(i, size)
    finally:
        release.set()


def test_deleting_a_lun_with_requests_queued_drops_their_replies(served: Served) -> None:
    """Delete revokes the connection, drains the worker, then closes the file:
    queued reads never touch a closed descriptor and their replies are dropped."""
    lun = served.array.lun("b")
    entered, release = stall(lun, "read_slice")
    try:
        client = served.client("b")
        for i in range(8):
            client.send_request(c.CMD_READ, i * MiB, 256 * KiB)
        assert entered.wait(TIMEOUT)
        threading.Timer(0.2, release.set).start()  # the drain in delete waits for it
        on_loop(served.loop, _delete(served.array, "b"))
    finally:
        release.set()
    assert client.drain_to_eof() == b""  # no reply of a revoked connection
    client.close()
    with served.client("a") as a:
        assert a.write(0, pattern(3, 4 * KiB)) == 0


async def _delete(array: Array, name: str) -> None:
    array.delete_lun(name, force=True)


def test_api_state_calls_run_on_the_luns_worker_behind_its_queued_writes(
    served: Served,
) -> None:
    """A hold on LUN B waits for B's queued (stalled) write and is taken on B's
    worker; LUN A's state answers meanwhile: the loop never waits for B."""
    b = served.array.lun("b")
    tracker = served.array.tracker("b")
    threads: list[str] = []
    real_acquire = tracker.acquire

    def acquire(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.current_thread().name)
        return real_acquire(*args, **kwargs)

    tracker.acquire = acquire  # type: ignore[method-assign]
    app = create_app(DaemonContext(served.array, served.server, "t"))
    headers = {"Authorization": "Bearer t"}
    entered, release = stall(b, "write")

    async def scenario() -> tuple[int, int, bool]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as http:
            hold = asyncio.ensure_future(
                http.post("/v1/luns/b/holds", json={"hold": "h"}, headers=headers)
            )
            other = await asyncio.wait_for(http.get("/v1/luns/a/state", headers=headers), 20)
            waited = not hold.done()
            release.set()
            return other.status_code, (await asyncio.wait_for(hold, 20)).status_code, waited

    try:
        with served.client("b") as client:
            client.send_request(c.CMD_WRITE, 0, payload=pattern(5, 4 * KiB))
            assert entered.wait(TIMEOUT)
            other, held, waited = on_loop(served.loop, scenario())
            assert client.read_reply().error == 0
    finally:
        release.set()
    assert (other, held, waited) == (200, 201, True)
    assert threads == ["lun-b"]


def test_a_cached_read_is_answered_while_the_luns_worker_is_busy(served: Served) -> None:
    """Page-cache reads need no hop: the loop answers them (RWF_NOWAIT) even
    while the LUN's own worker is stuck in a flush."""
    lun = served.array.lun("a")
    with served.client("a") as client:
        data = pattern(7, 4 * KiB)
        assert client.write(8 * KiB, data) == 0  # now in the page cache
        entered, release = stall(lun, "flush")
        try:
            cookie = client.send_request(c.CMD_FLUSH)
            assert entered.wait(TIMEOUT)
            with served.client("a", timeout=5.0) as reader:
                assert reader.read(8 * KiB, 4 * KiB).data == data
            release.set()
            assert client.read_reply().cookie == cookie
        finally:
            release.set()


def test_a_read_never_overtakes_its_connections_queued_write(served: Served) -> None:
    """A READ pipelined behind a WRITE of the same range (still queued on the
    worker) goes to the worker too, and sees the new data."""
    lun = served.array.lun("a")
    with served.client("a") as client:
        old, new = pattern(1, 4 * KiB), pattern(2, 4 * KiB)
        assert client.write(0, old) == 0  # cached: a fast path could serve it
        entered, release = stall(lun, "write")
        try:
            w, raw_w = client.pack_request(c.CMD_WRITE, 0, payload=new)
            r, raw_r = client.pack_request(c.CMD_READ, 0, 4 * KiB)
            client.send(raw_w + raw_r)
            assert entered.wait(TIMEOUT)
            release.set()
            replies = {reply.cookie: reply for reply in (client.read_reply(), client.read_reply())}
        finally:
            release.set()
        assert replies[w].error == 0
        assert replies[r].data == new
