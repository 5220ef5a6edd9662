"""The NBD server over real sockets: an in-process NbdServer on a uvloop loop in a
thread (file-backed LUNs in tmp_path), and a real daemon for the robustness checks."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from lunseal.engine.array import Array
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.server import NbdServer
from tests.support.daemon import Daemon
from tests.support.nbdclient import (
    NbdClient,
    Reply,
    info_request,
    meta_context_request,
    option_header,
    request_header,
)

T = TypeVar("T")
KiB, MiB = 1 << 10, 1 << 20
DISK = 64 * MiB  # LUN 0 "disk": the default export
RO = MiB  # read-only LUN "ro"
EPERM, EINVAL, ENOSPC, ENOTSUP = 1, 22, 28, 95
Address = str | tuple[str, int]


def pattern(seed: int, length: int) -> bytes:
    """Distinct, non-zero, position-dependent test data."""
    block = bytes((seed * 31 + i * 7 + 1) % 251 + 1 for i in range(4096))
    return (block * (length // 4096 + 1))[:length]


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


@dataclass
class Served:
    server: NbdServer
    loop: asyncio.AbstractEventLoop
    tcp: tuple[str, int]
    unix: str
    disk_file: Path

    def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the server's loop thread (the only thread that may touch it)."""

        async def run() -> T:
            return fn()

        return on_loop(self.loop, run())

    def connections(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def wait_connections(self, n: int, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections() != n:
            assert time.monotonic() < deadline, f"{self.connections()} connections, not {n}"
            time.sleep(0.01)

    def client(
        self, export: str = "disk", *, structured: bool = False, unix: bool = False
    ) -> NbdClient:
        client = NbdClient.connect(self.unix if unix else self.tcp)
        try:
            client.connect_export(export, structured=structured)
        except BaseException:
            client.close()
            raise
        return client


@pytest.fixture
def served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Served]:
    caplog.set_level(logging.WARNING)
    array = Array.open(tmp_path / "home")
    disk = array.create_lun("disk", DISK)
    array.create_lun("ro", RO, read_only=True)
    sock_dir = Path(tempfile.mkdtemp(prefix="lunseal-nbd-"))  # short: unix path limit
    loop = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    thread = threading.Thread(target=loop.run_forever, name="nbd-test-loop", daemon=True)
    thread.start()
    server = NbdServer(array)
    try:
        tcp = on_loop(loop, server.listen_tcp("127.0.0.1", 0))
        unix = on_loop(loop, server.listen_unix(sock_dir / "nbd.sock"))
        yield Served(server, loop, tcp, str(unix), Path(disk.record.path))
    finally:
        on_loop(loop, server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        array.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert errors == [], "the event loop reported unhandled errors"
    logged = caplog.get_records("setup") + caplog.get_records("call") + caplog.records
    assert [r.getMessage() for r in logged if r.levelno >= logging.ERROR] == []


# -- handshake ---------------------------------------------------------------------


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_go_reports_size_and_flags(served: Served, unix: bool) -> None:
    with NbdClient.connect(served.unix if unix else served.tcp) as client:
        assert client.handshake() == 0x3  # FIXED_NEWSTYLE | NO_ZEROES
        export = client.go("")
        assert export.size == DISK
        assert export.flags & c.TF_HAS_FLAGS
        assert not export.flags & c.TF_READ_ONLY


def test_export_name_with_zero_padding(served: Served) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake(c.FLAG_FIXED_NEWSTYLE)
        export = client.export_name("ro", no_zeroes=False)
        assert export.size == RO
        assert export.flags & c.TF_READ_ONLY
        assert client.read(0, 512).data == bytes(512)


@pytest.mark.parametrize("option", [c.OPT_INFO, c.OPT_LIST_META_CONTEXT, 0xBEEF])
def test_option_data_over_64k_is_too_big_and_negotiation_goes_on(
    served: Served, option: int
) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        client.structured_reply()
        [reply] = client.option(option, b"\x01" * (64 * KiB + 1))
        assert reply.type == c.REP_ERR_TOO_BIG
        assert client.go("disk").size == DISK
        assert_in_sync(client)


def test_list_meta_context_before_structured_replies(served: Served) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        replies = client.option(c.OPT_LIST_META_CONTEXT, meta_context_request("disk", ()))
        assert [r.type for r in replies] == [c.REP_META_CONTEXT, c.REP_ACK]
        assert replies[0].data[4:] == b"base:allocation"
        assert client.go("disk").size == DISK


def test_export_name_of_unknown_export_hangs_up(served: Served) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        client.send_option(c.OPT_EXPORT_NAME, b"nope")
        assert client.drain_to_eof() == b""


# -- data ----------------------------------------------------------------------------

PIECES = [(1, 1), (4095, 2), (8 * KiB, 4 * KiB), (MiB + 7, 300 * KiB), (DISK - 512, 512)]


@pytest.mark.parametrize("unix", [False, True], ids=["tcp", "unix"])
def test_read_write_roundtrip_simple(served: Served, unix: bool) -> None:
    with served.client(unix=unix) as client:
        for i, (offset, length) in enumerate(PIECES):
            assert client.write(offset, pattern(i, length)) == 0
        for i, (offset, length) in enumerate(PIECES):
            reply = client.read(offset, length)
            assert (reply.simple, reply.error) == (True, 0)
            assert reply.data == pattern(i, length)
        assert client.read(2 * MiB, 64 * KiB).data == bytes(64 * KiB)


def test_read_write_roundtrip_structured(served: Served) -> None:
    with served.client(structured=True) as client:
        for i, (offset, length) in enumerate(PIECES):
            assert client.write(offset, pattern(i, length)) == 0
        for i, (offset, length) in enumerate(PIECES):
            reply = client.read(offset, length)
            assert (reply.simple, reply.error) == (False, 0)
            assert reply.data == pattern(i, length)
            assert [ch.done for ch in reply.chunks] == [False] * (len(reply.chunks) - 1) + [True]


def test_structured_read_of_a_sparse_range_sends_holes(served: Served) -> None:
    data = pattern(3, 128 * KiB)
    with served.client(structured=True) as client:
        assert client.write(MiB, data) == 0
        reply = client.read(MiB - 256 * KiB, MiB)
        expected = bytes(256 * KiB) + data + bytes(MiB - 384 * KiB)
        assert reply.data == expected
        assert c.REPLY_TYPE_OFFSET_HOLE in {ch.type for ch in reply.chunks}


def test_structured_read_with_df_is_one_content_chunk(served: Served) -> None:
    data = pattern(4, 64 * KiB)
    with served.client(structured=True) as client:
        assert client.write(MiB, data) == 0
        reply = client.read(MiB - 32 * KiB, 512 * KiB, flags=c.CMD_FLAG_DF)
        assert reply.data == bytes(32 * KiB) + data + bytes(416 * KiB)
        content = [ch for ch in reply.chunks if not ch.is_error and ch.type != c.REPLY_TYPE_NONE]
        assert [ch.type for ch in content] == [c.REPLY_TYPE_OFFSET_DATA]


def test_writes_are_visible_to_other_connections(served: Served) -> None:
    with served.client() as writer, served.client(unix=True) as reader:
        assert writer.write(5 * MiB, pattern(9, 100 * KiB), flags=c.CMD_FLAG_FUA) == 0
        assert writer.request(c.CMD_FLUSH).error == 0
        assert reader.read(5 * MiB, 100 * KiB).data == pattern(9, 100 * KiB)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_64_pipelined_requests_all_answered_by_cookie(served: Served, structured: bool) -> None:
    size = 96 * KiB
    with served.client(structured=structured) as client:
        for i in range(32):
            assert client.write(i * size, pattern(i, size)) == 0
        expected: dict[int, bytes] = {}  # cookie -> data the reply must carry
        batch = []
        for i in range(32):
            read = client.pack_request(c.CMD_READ, i * size, size, cookie=(i * 7919) << 40)
            write = client.pack_request(
                c.CMD_WRITE, 16 * MiB + i * size, payload=pattern(100 + i, size)
            )
            expected |= {read[0]: pattern(i, size), write[0]: b""}
            batch += [read[1], write[1]]
        client.send(b"".join(batch))
        replies = [client.read_reply() for _ in range(64)]
        assert sorted(r.cookie for r in replies) == sorted(expected)
        for reply in replies:
            assert reply.error == 0
            assert reply.data == expected[reply.cookie]
        for i in range(32):
            assert client.read(16 * MiB + i * size, size).data == pattern(100 + i, size)


# -- errors that keep the connection -----------------------------------------------


def assert_in_sync(client: NbdClient) -> None:
    """The connection still works: a write and a read-back at a fixed spot."""
    data = pattern(42, 4 * KiB)
    assert client.write(40 * MiB, data) == 0
    assert client.read(40 * MiB, 4 * KiB).data == data


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize(
    ("offset", "length"),
    [(DISK, 1), (DISK - 512, 1024), (2**64 - 512, 1024), (2**63, 4096)],
)
def test_out_of_range_read_is_einval(
    served: Served, structured: bool, offset: int, length: int
) -> None:
    with served.client(structured=structured) as client:
        reply = client.read(offset, length)
        assert reply.error == EINVAL
        assert reply.data == b""
        assert_in_sync(client)


@pytest.mark.parametrize(("offset", "length"), [(DISK, 1), (DISK - 512, 1024), (2**63, 4096)])
def test_out_of_range_write_is_enospc(served: Served, offset: int, length: int) -> None:
    with served.client() as client:
        assert client.write(offset, pattern(1, length)) == ENOSPC
        assert client.read(DISK - 512, 512).data == bytes(512)
        assert_in_sync(client)


@pytest.mark.parametrize(("offset", "length"), [(DISK, 1), (DISK - 512, 1024)])
def test_out_of_range_write_zeroes_is_enospc(served: Served, offset: int, length: int) -> None:
    with served.client() as client:
        assert client.request(c.CMD_WRITE_ZEROES, offset, length).error == ENOSPC
        assert_in_sync(client)


@pytest.mark.parametrize(("offset", "length"), [(DISK, 1), (DISK - 512, 1024), (2**63, 4096)])
def test_out_of_range_trim_is_einval(served: Served, offset: int, length: int) -> None:
    """proto.md: EINVAL for a read or trim past the end (ENOSPC is for writes)."""
    with served.client() as client:
        assert client.request(c.CMD_TRIM, offset, length).error == EINVAL
        assert_in_sync(client)


def test_read_only_lun_refuses_every_write(served: Served) -> None:
    with served.client("ro") as client:
        assert client.write(0, pattern(1, 4096)) == EPERM
        assert client.request(c.CMD_TRIM, 0, 4096).error == EPERM
        assert client.request(c.CMD_WRITE_ZEROES, 0, 4096).error == EPERM
        reply = client.read(0, 4096)
        assert (reply.error, reply.data) == (0, bytes(4096))


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
@pytest.mark.parametrize(
    ("kind", "flags"),
    [
        pytest.param(9, 0, id="command-9"),
        pytest.param(0xFFFF, 0, id="command-ffff"),
        pytest.param(c.CMD_READ, 0x8000, id="read-unknown-flag"),
        pytest.param(c.CMD_READ, c.CMD_FLAG_REQ_ONE, id="read-req-one"),
        pytest.param(c.CMD_TRIM, c.CMD_FLAG_NO_HOLE, id="trim-no-hole"),
        pytest.param(c.CMD_WRITE_ZEROES, c.CMD_FLAG_DF, id="zeroes-df"),
        pytest.param(c.CMD_FLUSH, c.CMD_FLAG_NO_HOLE, id="flush-no-hole"),
    ],
)
def test_unknown_command_or_flag_is_einval(
    served: Served, structured: bool, kind: int, flags: int
) -> None:
    with served.client(structured=structured) as client:
        reply = client.request(kind, 0, 512 if kind == c.CMD_READ else 0, flags=flags)
        assert reply.error == EINVAL
        assert reply.data == b""
        assert_in_sync(client)


def test_df_without_structured_replies_is_einval(served: Served) -> None:
    with served.client() as client:
        assert client.read(0, 512, flags=c.CMD_FLAG_DF).error == EINVAL
        assert_in_sync(client)


def test_write_with_unknown_flag_is_einval_and_payload_consumed(served: Served) -> None:
    with served.client() as client:
        assert client.write(0, pattern(5, 8 * KiB), flags=0x4000) == EINVAL
        assert client.read(0, 8 * KiB).data == bytes(8 * KiB)
        assert_in_sync(client)


@pytest.mark.parametrize("kind", [c.CMD_READ, c.CMD_FLUSH, c.CMD_CACHE])
def test_fua_is_accepted_on_every_command(served: Served, kind: int) -> None:
    with served.client() as client:
        assert client.request(kind, 0, 0 if kind == c.CMD_FLUSH else 512, flags=1).error == 0


def test_oversize_write_is_refused_and_the_stream_stays_in_sync(served: Served) -> None:
    with served.client() as client:
        cookie = client.send_request(c.CMD_WRITE, 0, payload=b"\x77" * (32 * MiB + 1))
        reply = client.read_reply()
        assert reply.cookie == cookie
        assert reply.error in (EINVAL, c.ENOMEM, c.EOVERFLOW)
        assert client.read(0, 64 * KiB).data == bytes(64 * KiB)
        assert_in_sync(client)


def test_oversize_write_reply_waits_for_the_whole_payload(served: Served) -> None:
    """A reply that arrives while the client is still sending the payload makes
    libnbd declare the connection dead: nothing may come before the last byte."""
    payload = b"\x77" * (32 * MiB + 4096)
    with served.client() as client:
        header = request_header(c.CMD_WRITE, 0, len(payload), cookie=77)
        client.send(header + payload[:-1])
        client.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            client.sock.recv(1)  # the server owes nothing yet
        client.sock.settimeout(client.timeout)
        client.send(payload[-1:])
        reply = client.read_reply()
        assert (reply.cookie, reply.error) == (77, EINVAL)
        assert_in_sync(client)


def test_absurd_write_length_closes_the_connection(served: Served) -> None:
    with served.client() as client:
        client.send(request_header(c.CMD_WRITE, 0, 2**32 - 1) + bytes(4096))
        assert client.drain_to_eof() == b""


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_oversize_read_is_refused_without_data(served: Served, structured: bool) -> None:
    with served.client(structured=structured) as client:
        reply = client.read(0, 32 * MiB + 1)
        assert reply.error in (EINVAL, c.ENOMEM, c.EOVERFLOW)
        assert reply.data == b""
        assert_in_sync(client)


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_zero_length_requests_do_not_disconnect(served: Served, structured: bool) -> None:
    with served.client(structured=structured) as client:
        for kind in (c.CMD_READ, c.CMD_TRIM, c.CMD_CACHE, c.CMD_WRITE_ZEROES):
            reply = client.request(kind, 4096, 0)
            assert reply.data == b""
        assert client.write(4096, b"") == 0
        if structured:
            client.request(c.CMD_BLOCK_STATUS, 4096, 0)
        assert_in_sync(client)


# -- other commands ------------------------------------------------------------------


def test_flush_and_cache(served: Served) -> None:
    with served.client() as client:
        assert client.write(0, pattern(1, 64 * KiB)) == 0
        assert client.request(c.CMD_FLUSH).error == 0
        assert client.request(c.CMD_CACHE, 0, MiB).error == 0
        assert client.request(c.CMD_CACHE, DISK - 512, 1024).error == EINVAL
        assert_in_sync(client)


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_write_zeroes_may_punch_a_hole(served: Served) -> None:
    with served.client() as client:
        assert client.write(8 * MiB, pattern(2, MiB)) == 0
        before = allocated(served.disk_file)
        assert client.request(c.CMD_WRITE_ZEROES, 8 * MiB, MiB).error == 0
        assert client.read(8 * MiB, MiB).data == bytes(MiB)
        assert allocated(served.disk_file) <= before - MiB


def test_write_zeroes_no_hole_keeps_storage_allocated(served: Served) -> None:
    with served.client() as client:
        assert client.write(8 * MiB, pattern(2, MiB)) == 0
        assert client.request(c.CMD_TRIM, 8 * MiB, MiB).error == 0
        trimmed = allocated(served.disk_file)
        reply = client.request(c.CMD_WRITE_ZEROES, 8 * MiB, MiB, flags=c.CMD_FLAG_NO_HOLE)
        assert reply.error == 0
        assert client.read(8 * MiB, MiB).data == bytes(MiB)
        assert allocated(served.disk_file) >= trimmed + MiB


def test_fast_zero(served: Served) -> None:
    with served.client() as client:
        assert client.write(8 * MiB, pattern(2, MiB)) == 0
        assert (
            client.request(c.CMD_WRITE_ZEROES, 8 * MiB, MiB, flags=c.CMD_FLAG_FAST_ZERO).error == 0
        )
        assert client.read(8 * MiB, MiB).data == bytes(MiB)


def test_fast_zero_no_hole_is_fast_or_enotsup_untouched(served: Served) -> None:
    data = pattern(3, MiB)
    with served.client() as client:
        assert client.write(8 * MiB, data) == 0
        flags = c.CMD_FLAG_FAST_ZERO | c.CMD_FLAG_NO_HOLE
        error = client.request(c.CMD_WRITE_ZEROES, 8 * MiB, MiB, flags=flags).error
        assert error in (0, ENOTSUP)
        assert client.read(8 * MiB, MiB).data == (bytes(MiB) if error == 0 else data)


# -- BLOCK_STATUS ----------------------------------------------------------------------


def status_at(extents: list[tuple[int, int]], start: int, offset: int) -> int:
    pos = start
    for length, flags in extents:
        if pos <= offset < pos + length:
            return flags
        pos += length
    raise AssertionError(f"offset {offset} not covered by {extents}")


def block_status(client: NbdClient, offset: int, length: int, flags: int = 0) -> Reply:
    reply = client.request(c.CMD_BLOCK_STATUS, offset, length, flags=flags)
    assert not reply.simple
    return reply


@pytest.mark.parametrize("structured", [False, True], ids=["simple", "structured"])
def test_block_status_without_meta_context_is_einval(served: Served, structured: bool) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        if structured:
            client.structured_reply()
        client.go("disk")
        assert client.request(c.CMD_BLOCK_STATUS, 0, 4096).error == EINVAL
        assert_in_sync(client)


def test_block_status_shows_a_hole_after_trim(served: Served) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        client.structured_reply()
        [context_id] = client.set_meta_context("disk", "base:allocation")
        client.go("disk")
        assert client.write(0, pattern(1, MiB)) == 0
        assert client.request(c.CMD_TRIM, 256 * KiB, 256 * KiB).error == 0
        reply = block_status(client, 0, MiB)
        [chunk] = reply.chunks
        assert chunk.done
        ctx, extents = chunk.extents()
        assert ctx == context_id
        assert all(length > 0 for length, _ in extents)
        assert sum(length for length, _ in extents[:-1]) < MiB <= sum(n for n, _ in extents)
        assert status_at(extents, 0, 0) == 0
        assert status_at(extents, 0, 256 * KiB) & c.STATE_HOLE
        assert status_at(extents, 0, 512 * KiB - 1) & c.STATE_ZERO
        assert status_at(extents, 0, 512 * KiB) == 0


def test_block_status_req_one_gives_exactly_one_extent(served: Served) -> None:
    with served.client(structured=True) as client:
        assert client.write(0, pattern(1, MiB)) == 0
        assert client.request(c.CMD_TRIM, 256 * KiB, 256 * KiB).error == 0
        for offset, length, expected in [
            (0, MiB, (256 * KiB, 0)),
            (128 * KiB, 64 * KiB, (64 * KiB, 0)),
            (256 * KiB, MiB, (256 * KiB, c.STATE_HOLE | c.STATE_ZERO)),
        ]:
            [chunk] = block_status(client, offset, length, c.CMD_FLAG_REQ_ONE).chunks
            assert chunk.extents()[1] == [expected]


def test_block_status_past_the_end_is_einval(served: Served) -> None:
    with served.client(structured=True) as client:
        reply = block_status(client, DISK - 512, 1024)
        [chunk] = reply.chunks
        assert chunk.is_error
        assert chunk.done
        assert chunk.error()[0] == EINVAL
        assert_in_sync(client)


def test_structured_read_error_is_an_error_chunk(served: Served) -> None:
    with served.client(structured=True) as client:
        reply = client.read(DISK, 512)
        [chunk] = reply.chunks
        assert (chunk.type, chunk.done) == (c.REPLY_TYPE_ERROR, True)
        error, message = chunk.error()
        assert error == EINVAL
        assert message
        assert_in_sync(client)


# -- disconnects -----------------------------------------------------------------------


def test_disc_finishes_pending_requests_then_closes(served: Served) -> None:
    data = pattern(6, 64 * KiB)
    with served.client() as client:
        served.wait_connections(1)
        cookie, write = client.pack_request(c.CMD_WRITE, 3 * MiB, payload=data)
        client.send(write + request_header(c.CMD_DISC, cookie=99))
        assert client.drain_to_eof() == simple_reply(cookie)
    served.wait_connections(0)
    with served.client() as client:
        assert client.read(3 * MiB, 64 * KiB).data == data
        assert client.disconnect() == b""


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return (0x67446698).to_bytes(4, "big") + error.to_bytes(4, "big") + cookie.to_bytes(8, "big")


def test_abort_acks_then_closes(served: Served) -> None:
    with NbdClient.connect(served.tcp) as client:
        client.handshake()
        replies = client.option(c.OPT_ABORT)
        assert [r.type for r in replies] == [c.REP_ACK]
        assert client.drain_to_eof() == b""


# -- robustness: a misbehaving client loses only its own connection ------------------------

Attack = Callable[[NbdClient], None]


def http_garbage(client: NbdClient) -> None:
    client.read_greeting()
    client.send(b"GET / HTTP/1.1\r\nHost: lunseal\r\n\r\n")


def bad_client_flags(client: NbdClient) -> None:
    client.handshake(client_flags=0x4)


def huge_option_length(client: NbdClient) -> None:
    client.handshake()
    client.send(option_header(c.OPT_GO, 0xFFFFFFFF) + info_request("disk"))


def bad_option_magic(client: NbdClient) -> None:
    client.handshake()
    client.send(option_header(c.OPT_LIST, 0, magic=0x1234))


def too_many_options(client: NbdClient) -> None:
    client.handshake()
    for _ in range(256):
        assert client.option(0xBEEF)[-1].type == c.REP_ERR_UNSUP
    client.send_option(0xBEEF)


def garbage_in_transmission(client: NbdClient) -> None:
    client.connect_export("")
    client.send(bytes(range(256)) * 4)


def bad_request_magic(client: NbdClient) -> None:
    client.connect_export("")
    client.send(request_header(c.CMD_READ, 0, 512, magic=0x25609514))


def truncated_header_then_close(client: NbdClient) -> None:
    client.connect_export("")
    client.send(request_header(c.CMD_READ, 0, 512)[:10])
    client.sock.shutdown(socket.SHUT_WR)


ATTACKS = [
    http_garbage,
    bad_client_flags,
    huge_option_length,
    bad_option_magic,
    too_many_options,
    garbage_in_transmission,
    bad_request_magic,
    truncated_header_then_close,
]


def attack_and_check(attack: Attack, attacker: Address, bystander: NbdClient, i: int) -> None:
    """The attacker is hung up on; the bystander (connected all along) is served."""
    with NbdClient.connect(attacker) as client:
        attack(client)
        client.drain_to_eof()  # TimeoutError if the server keeps the connection
    data = pattern(i, 8 * KiB)
    assert bystander.write(i * MiB, data) == 0
    assert bystander.read(i * MiB, 8 * KiB).data == data


@pytest.mark.parametrize("attack", ATTACKS)
def test_misbehaving_client_loses_only_its_connection(served: Served, attack: Attack) -> None:
    with served.client(unix=True) as bystander:
        attack_and_check(attack, served.tcp, bystander, 1)
        served.wait_connections(1)
        with served.client() as newcomer:
            assert newcomer.read(MiB, 8 * KiB).data == pattern(1, 8 * KiB)
        assert_in_sync(bystander)


@pytest.mark.daemon
def test_daemon_survives_every_misbehaving_client(daemon: Daemon) -> None:
    host, port = daemon.tcp.rsplit(":", 1)
    tcp = (host.strip("[]"), int(port))
    with NbdClient.connect(daemon.socket) as bystander:
        bystander.connect_export("demo", structured=True)
        for i, attack in enumerate(ATTACKS):
            attack_and_check(attack, tcp if i % 2 else daemon.socket, bystander, i)
        assert daemon.proc is not None
        assert daemon.proc.poll() is None
        with NbdClient.connect(tcp) as newcomer:
            newcomer.connect_export("")
            assert newcomer.read(3 * MiB, 8 * KiB).data == pattern(3, 8 * KiB)
    with daemon.client() as api:
        assert [lun.name for lun in api.list_luns()] == ["demo"]


# -- resource bounds ---------------------------------------------------------------------

BIG_READ = 32 * MiB
GREEDY_READS = 40  # 1.25 GiB of replies if they were all buffered


def rss(pid: int | None = None) -> int:
    status = Path(f"/proc/{pid or 'self'}/status").read_text()
    [line] = [ln for ln in status.splitlines() if ln.startswith("VmRSS:")]
    return int(line.split()[1]) * KiB


def greedy_client(address: Address, export: str) -> NbdClient:
    """A client with a small receive buffer that will pipeline reads and not read replies."""
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * KiB)
    sock.settimeout(30)
    sock.connect(address)
    client = NbdClient(sock, timeout=30)
    client.connect_export(export)  # simple replies: every read is one file slice
    return client


def send_greedy_reads(client: NbdClient) -> None:
    requests = [
        client.pack_request(c.CMD_READ, 0, BIG_READ, cookie=i + 1)[1] for i in range(GREEDY_READS)
    ]
    client.send(b"".join(requests))


def wait_until_stable(sample: Callable[[], object], polls: int = 400) -> None:
    """Until ``sample`` gives the same value 10 polls in a row (at most ``polls`` polls)."""
    last, same = None, 0
    for _ in range(polls):
        value = sample()
        same = same + 1 if value == last else 0
        if same >= 10:
            return
        last = value
        time.sleep(0.05)
    raise AssertionError(f"still changing after {polls} polls: {last}")


def check_greedy_replies(client: NbdClient, head: bytes) -> None:
    """Every reply, in full and correct: nothing was lost while the server held back.
    (The LUN holds ``head`` at 0 and zeroes up to BIG_READ.)"""
    for i in range(GREEDY_READS):
        reply = client.read_reply()
        assert (reply.cookie, reply.error) == (i + 1, 0)
        assert len(reply.data) == BIG_READ
        assert reply.data[: len(head)] == head
        assert reply.data[len(head) :].count(0) == BIG_READ - len(head)


def test_pipelined_reads_never_read_keep_memory_bounded(served: Served) -> None:
    head = pattern(1, MiB)
    with served.client(unix=True) as bystander:
        assert bystander.write(0, head) == 0
        with greedy_client(served.tcp, "disk") as greedy:
            served.wait_connections(2)
            before = rss()
            send_greedy_reads(greedy)
            [conn] = served.call(
                lambda: [x for x in served.server.connections if not x.peer.startswith("unix")]
            )
            wait_until_stable(rss)
            grown = rss() - before
            # Meanwhile the other client is served as usual.
            assert_in_sync(bystander)
            assert grown < 128 * MiB, f"the server grew by {grown >> 20} MiB"
            queued, peak, in_transport = served.call(
                lambda: (
                    conn.queued_bytes,
                    conn.peak_queued,
                    conn.transport.get_write_buffer_size() if conn.transport else 0,
                )
            )
            assert in_transport <= 16 * MiB
            # The server's own accounting: at most one reply past the cap.
            assert 0 < queued <= peak <= 16 * MiB + 33 * MiB
            check_greedy_replies(greedy, head)
            assert_in_sync(greedy)


def test_handshake_timeout_closes_a_stalled_client(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.call(lambda: setattr(served.server, "handshake_timeout", 0.3))
    with served.client() as early:  # negotiated in time: stays
        with NbdClient.connect(served.tcp) as stalled:
            stalled.read_greeting()
            assert stalled.drain_to_eof(timeout=20) == b""
        with NbdClient.connect(served.unix) as half:
            half.handshake()
            half.send(option_header(c.OPT_GO, 100))  # ...and never the data
            assert half.drain_to_eof(timeout=20) == b""
        assert_in_sync(early)
    assert sum("did not finish negotiating" in r.getMessage() for r in caplog.records) == 2


def test_connection_cap_refuses_newcomers_and_keeps_the_rest(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    served.call(lambda: setattr(served.server, "max_connections", 3))
    clients = [served.client(), served.client(unix=True), served.client()]
    try:
        for i in range(20):
            with NbdClient.connect(served.unix if i % 2 else served.tcp) as extra:
                assert extra.drain_to_eof(timeout=20) == b""  # not even a greeting
        for client in clients:
            assert_in_sync(client)
        refused = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refused) == 1, "refusals are logged at most once per period"
        assert "limit (--max-connections) is 3" in refused[0].getMessage()
        clients.pop().close()
        served.wait_connections(2)
        with served.client() as newcomer:
            assert_in_sync(newcomer)
    finally:
        for client in clients:
            client.close()


def test_connection_cap_is_lowered_to_fit_the_open_file_limit(
    served: Served, caplog: pytest.LogCaptureFixture
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (300, hard))
    try:
        server = NbdServer(served.server.array, max_connections=10_000)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert server.max_connections <= 300 - 100
    assert any("limit lowered" in r.getMessage() for r in caplog.records)


@pytest.mark.daemon
def test_daemon_memory_stays_bounded_under_greedy_reads(daemon: Daemon) -> None:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    with NbdClient.connect(daemon.socket) as bystander:
        bystander.connect_export("demo")
        head = pattern(3, 64 * KiB)
        assert bystander.write(0, head) == 0
        with greedy_client(daemon.socket, "demo") as greedy:
            assert greedy.read(0, 4096).error == 0
            before = rss(pid)
            send_greedy_reads(greedy)
            wait_until_stable(lambda: rss(pid))
            grown = rss(pid) - before
            assert bystander.write(BIG_READ, head) == 0  # served meanwhile
            assert bystander.read(BIG_READ, 64 * KiB).data == head
            assert grown < 128 * MiB, f"the daemon grew by {grown >> 20} MiB"
            check_greedy_replies(greedy, head)
    assert daemon.proc.poll() is None


@pytest.mark.daemon
def test_daemon_handshake_timeout_option(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home", extra_args=["--handshake-timeout", "0.5"]).start()
    try:
        with NbdClient.connect(daemon.socket) as stalled:
            stalled.read_greeting()
            assert stalled.drain_to_eof(timeout=20) == b""
        assert "did not finish negotiating within 0.5s" in daemon.log()
    finally:
        daemon.kill()


@pytest.mark.daemon
def test_daemon_out_of_descriptors_says_so_and_recovers(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home").start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, hard))
        clients = []
        try:
            for _ in range(12):
                clients.append(NbdClient.connect(daemon.socket))
            deadline = time.monotonic() + 30
            while "cannot accept NBD connections" not in daemon.log():
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.05)
        finally:
            for client in clients:
                client.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        # The listener survived: new clients and the API are served again.
        deadline = time.monotonic() + 30
        while True:
            try:
                with NbdClient.connect(daemon.socket) as client:
                    client.connect_export("demo")
                    assert client.read(0, 4096).error == 0
                break
            except (EOFError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
        with daemon.client() as api:
            assert [lun.name for lun in api.list_luns()] == ["demo"]
        assert daemon.log().count("cannot accept NBD connections") <= 3
    finally:
        daemon.kill()


@pytest.mark.daemon
def test_daemon_says_when_the_api_cannot_accept(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home").start()
    assert daemon.proc is not None
    pid = daemon.proc.pid
    host, port = daemon.api_url.removeprefix("http://").rsplit(":", 1)
    try:
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        in_use = len(os.listdir(f"/proc/{pid}/fd"))
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (in_use + 3, hard))
        clients = []
        try:
            for _ in range(12):  # idle HTTP connections: the API holds each one open
                clients.append(socket.create_connection((host, int(port)), timeout=10))
            deadline = time.monotonic() + 30
            while "out of file descriptors" not in daemon.log():
                assert time.monotonic() < deadline, daemon.log()
                time.sleep(0.05)
        finally:
            for sock in clients:
                sock.close()
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
        deadline = time.monotonic() + 30
        while True:
            try:
                with daemon.client() as api:
                    assert [lun.name for lun in api.list_luns()] == ["demo"]
                break
            except Exception:
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        daemon.kill()
