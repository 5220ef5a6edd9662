"""lunseal.host.nbd_client.NbdClient (the host tools' NBD side) against a real daemon,
plus two tiny real-socket servers for what a daemon never does."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lunseal.errors import BackendError, InvalidArgument, NotFound, ProtocolError
from lunseal.host.nbd_client import PIPELINE, NbdClient, connect_address
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

KiB, MiB = 1 << 10, 1 << 20
SIZE = 8 * MiB
EINVAL, ENOSPC, EPERM = 22, 28, 1


@pytest.fixture
def lun(daemon: Daemon) -> str:
    with daemon.client() as api:
        api.create_lun("c", SIZE)
        api.create_lun("ro", MiB, read_only=True)
    return "c"


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_write_read_zero_flush_roundtrip(daemon: Daemon, lun: str, tcp: bool) -> None:
    small, big = os.urandom(4 * KiB), os.urandom(3 * MiB + 512)  # below/above 64K payloads
    with NbdClient(daemon.uri(lun, tcp=tcp), timeout=10) as nbd:
        assert (nbd.size, nbd.export, nbd.read_only) == (SIZE, lun, False)
        assert nbd.read(0, 64 * KiB) == bytes(64 * KiB)
        nbd.write(12345, small)
        nbd.write(MiB, big, fua=True)
        nbd.flush()
        assert nbd.read(12345, len(small)) == small
        assert nbd.read(MiB, len(big)) == big
        nbd.zero(MiB + 4 * KiB, 8 * KiB)
        got = nbd.read(MiB, 16 * KiB)
        assert got == big[: 4 * KiB] + bytes(8 * KiB) + big[12 * KiB : 16 * KiB]
        nbd.flush()
    # A second connection (and so the server) sees the same bytes.
    with NbdClient(daemon.uri(lun), timeout=10) as nbd:
        assert nbd.read(12345, len(small)) == small
        assert nbd.read(MiB + 12 * KiB, 4 * KiB) == big[12 * KiB : 16 * KiB]


def test_read_ranges_yields_in_request_order(daemon: Daemon, lun: str) -> None:
    data = os.urandom(SIZE)
    with NbdClient(daemon.uri(lun), timeout=10) as nbd:
        for offset in range(0, SIZE, MiB):
            nbd.write(offset, data[offset : offset + MiB])
        # Out of offset order, overlapping, varied lengths, more than PIPELINE in flight.
        ranges = [(7 * MiB, MiB), (0, 1), (3 * MiB + 7, 100 * KiB), (0, 2 * MiB)]
        ranges += [((i * 37 * KiB) % (SIZE - 64 * KiB), 1 + i * 513) for i in range(3 * PIPELINE)]
        got = list(nbd.read_ranges(ranges))
        assert [off for off, _ in got] == [off for off, _ in ranges]
        for (offset, length), (_, chunk) in zip(ranges, got, strict=True):
            assert chunk == data[offset : offset + length]
        assert list(nbd.read_ranges([])) == []
        assert list(nbd.read_ranges(iter([(5, 3)]))) == [(5, data[5:8])]
        # The connection is in step afterwards: no reply left over.
        assert nbd.read(SIZE - 10, 10) == data[-10:]


def test_request_errors_keep_the_connection(daemon: Daemon, lun: str) -> None:
    with NbdClient(daemon.uri(lun), timeout=10) as nbd:
        with pytest.raises(BackendError, match=f"error {EINVAL}"):
            nbd.read(SIZE, 4 * KiB)
        with pytest.raises(BackendError, match=f"error {ENOSPC}"):
            nbd.write(SIZE - 10, bytes(4 * KiB))
        nbd.write(0, b"still here")
        assert nbd.read(0, 10) == b"still here"
    with NbdClient(daemon.uri("ro"), timeout=10) as nbd:
        assert nbd.read_only
        with pytest.raises(BackendError, match=f"error {EPERM}"):
            nbd.write(0, b"x")
        assert nbd.read(0, 1) == b"\0"


def test_unknown_export(daemon: Daemon) -> None:
    with pytest.raises(NotFound, match="NBD export 'nope': no export named 'nope'"):
        NbdClient(daemon.uri("nope"), timeout=10)
    with pytest.raises(NotFound, match="'nope'"):
        NbdClient(daemon.uri("nope", tcp=True), timeout=10)


def test_empty_export_name_is_the_default_export(daemon: Daemon) -> None:
    with NbdClient(f"nbd+unix:///?socket={daemon.socket}", timeout=10) as nbd:
        assert nbd.export == ""
        assert nbd.size == 1 << 30  # the daemon's LUN 0 "demo"


@pytest.mark.parametrize(
    ("uri", "error", "message"),
    [
        ("http://localhost/c", InvalidArgument, "not an NBD URI"),
        ("c", InvalidArgument, "not an NBD URI"),
        ("nbd+unix:///c", InvalidArgument, r"need \?socket=PATH"),
        ("nbd+unix:///c?socket=/nonexistent/nbd.sock", BackendError, "cannot connect"),
    ],
)
def test_bad_uris(uri: str, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        NbdClient(uri, timeout=5)


def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(BackendError, match=r"cannot connect to nbd://127\.0\.0\.1"):
            NbdClient(f"nbd://127.0.0.1:{port}/c", timeout=5)


def test_connect_address() -> None:
    assert connect_address("nbd+unix:///a%20b?socket=/run/x.sock") == (
        socket.AF_UNIX,
        "/run/x.sock",
        "a b",
    )
    assert connect_address("nbd://10.0.0.1/e") == (socket.AF_INET, ("10.0.0.1", 10809), "e")
    assert connect_address("nbd://[::1]:1234/e") == (socket.AF_INET6, ("::1", 1234), "e")
    assert connect_address("nbd:///e") == (socket.AF_INET, ("localhost", 10809), "e")


@pytest.fixture
def fake_server(tmp_path: Path) -> Iterator[Callable[[bytes], str]]:
    """A Unix-socket server that sends ``greeting`` to its one client and hangs up."""
    threads: list[threading.Thread] = []
    listeners: list[socket.socket] = []

    def start(greeting: bytes) -> str:
        path = str(tmp_path / f"fake{len(listeners)}.sock")
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(10)
        listeners.append(listener)

        def serve() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.sendall(greeting)

        thread = threading.Thread(target=serve, daemon=True)
        thread.start()
        threads.append(thread)
        return f"nbd+unix:///x?socket={path}"

    yield start
    for thread in threads:
        thread.join(10)
    for listener in listeners:
        listener.close()


def test_not_an_nbd_server(fake_server: Callable[[bytes], str]) -> None:
    with pytest.raises(ProtocolError, match="not a fixed-newstyle NBD server"):
        NbdClient(fake_server(b"HTTP/1.1 400 Bad Request\r\n\r\n"), timeout=5)


def test_server_hangs_up_during_the_handshake(fake_server: Callable[[bytes], str]) -> None:
    with pytest.raises(ProtocolError, match="closed the connection"):
        NbdClient(fake_server(b"NBDMAGIC"), timeout=5)
