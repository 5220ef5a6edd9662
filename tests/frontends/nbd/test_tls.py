"""NBD STARTTLS over real sockets: an in-process NbdServer with TLS on a uvloop
loop in a thread, driven by the raw test client wrapped in Python's ssl."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from lunseal.engine.array import Array
from lunseal.errors import InvalidArgument
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.negotiation import Negotiator
from lunseal.frontends.nbd.server import NbdServer
from lunseal.tlsconfig import ServerTls, TlsFiles, TlsMode, build_server_context
from tests.frontends.nbd.test_server import on_loop, pattern
from tests.support.nbdclient import (
    NbdClient,
    meta_context_request,
    option_header,
    parse_option_reply,
)
from tests.support.tlscerts import Pki, make_pki

T = TypeVar("T")
MiB = 1 << 20
DISK = 16 * MiB


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


@dataclass
class TlsServed:
    server: NbdServer
    loop: asyncio.AbstractEventLoop
    tcp: tuple[str, int]
    unix: str
    pki: Pki

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return on_loop(self.loop, run())

    def connections(self) -> list[Any]:
        return self.call(lambda: list(self.server.connections))

    def clear(self) -> NbdClient:
        client = NbdClient.connect(self.tcp)
        client.handshake()
        return client

    def encrypted(self, context: ssl.SSLContext | None = None) -> NbdClient:
        client = self.clear()
        try:
            starttls(client, context or self.pki.client_context())
        except BaseException:
            client.close()
            raise
        return client


def starttls(client: NbdClient, context: ssl.SSLContext) -> None:
    [reply] = client.option(c.OPT_STARTTLS)
    assert reply.type == c.REP_ACK, reply.text
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")


def make_served(
    tmp_path: Path, pki: Pki, mode: TlsMode, files: TlsFiles, handshake_timeout: float = 10.0
) -> Iterator[TlsServed]:
    array = Array.open(tmp_path / "home")
    array.create_lun("disk", DISK)
    sock_dir = Path(tempfile.mkdtemp(prefix="lunseal-tls-"))
    loop = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    thread = threading.Thread(target=loop.run_forever, name="nbd-tls-loop", daemon=True)
    thread.start()
    server = NbdServer(array, tls=ServerTls(files, mode), handshake_timeout=handshake_timeout)
    try:
        tcp = on_loop(loop, server.listen_tcp("127.0.0.1", 0))
        unix = on_loop(loop, server.listen_unix(sock_dir / "nbd.sock"))
        yield TlsServed(server, loop, tcp, str(unix), pki)
    finally:
        on_loop(loop, server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        array.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    assert errors == [], "the event loop reported unhandled errors"


@pytest.fixture
def required(tmp_path: Path, pki: Pki) -> Iterator[TlsServed]:
    yield from make_served(tmp_path, pki, TlsMode.REQUIRE, pki.server_files())


@pytest.fixture
def allowed(tmp_path: Path, pki: Pki) -> Iterator[TlsServed]:
    yield from make_served(tmp_path, pki, TlsMode.ALLOW, pki.server_files())


@pytest.fixture
def verifying(tmp_path: Path, pki: Pki) -> Iterator[TlsServed]:
    files = pki.server_files(verify_client=True)
    yield from make_served(tmp_path, pki, TlsMode.REQUIRE, files)


# -- require -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "data"),
    [
        (c.OPT_LIST, b""),
        (c.OPT_INFO, b"\x00\x00\x00\x04disk\x00\x00"),
        (c.OPT_GO, b"\x00\x00\x00\x04disk\x00\x00"),
        (c.OPT_STRUCTURED_REPLY, b""),
        (c.OPT_LIST_META_CONTEXT, meta_context_request("disk", ())),
    ],
)
def test_required_tls_refuses_every_option_in_clear(
    required: TlsServed, option: int, data: bytes
) -> None:
    with required.clear() as client:
        [reply] = client.option(option, data)
        assert reply.type == c.REP_ERR_TLS_REQD
        assert b"disk" not in reply.data
        # Still negotiating: the client may upgrade now.
        starttls(client, required.pki.client_context())
        assert client.go("disk").size == DISK


def test_required_tls_hangs_up_on_export_name_in_clear(required: TlsServed) -> None:
    with required.clear() as client:
        client.send_option(c.OPT_EXPORT_NAME, b"disk")
        assert client.drain_to_eof() == b""


def test_required_tls_serves_data_after_starttls(required: TlsServed) -> None:
    big = pattern(5, 4 * MiB)  # large enough that the clear-text path would sendfile it
    with required.encrypted() as client:
        replies = client.checked_option(c.OPT_LIST)
        assert [r.type for r in replies] == [c.REP_SERVER, c.REP_ACK]
        client.go("disk")
        assert client.write(MiB, big) == 0
        assert client.read(MiB, len(big)).data == big
        assert client.read(0, 4096).data == bytes(4096)
    [conn] = required.connections() or [None]
    assert conn is None or conn.tls_active


def test_unix_socket_stays_clear_when_tls_is_required(required: TlsServed) -> None:
    with NbdClient.connect(required.unix) as client:
        client.handshake()
        assert client.go("disk").size == DISK


# -- allow -----------------------------------------------------------------------------


def test_allowed_tls_serves_clear_and_encrypted_clients(allowed: TlsServed) -> None:
    data = pattern(2, 64 << 10)
    with allowed.clear() as client:
        client.go("disk")
        assert client.write(0, data) == 0
    with allowed.encrypted() as client:
        client.go("disk")
        assert client.read(0, len(data)).data == data


def test_second_starttls_is_invalid(allowed: TlsServed) -> None:
    with allowed.encrypted() as client:
        [reply] = client.option(c.OPT_STARTTLS)
        assert reply.type == c.REP_ERR_INVALID
        assert client.go("disk").size == DISK


def test_state_negotiated_in_clear_does_not_survive_starttls(allowed: TlsServed) -> None:
    with allowed.clear() as client:
        client.structured_reply()
        starttls(client, allowed.pki.client_context())
        client.structured = False
        # Structured replies were chosen in clear text: after TLS they are not on.
        [reply] = client.option(c.OPT_SET_META_CONTEXT, meta_context_request("disk", ()))
        assert reply.type == c.REP_ERR_INVALID
        client.go("disk")
        assert client.read(0, 512).simple


def test_data_sent_after_starttls_before_the_handshake_closes(
    allowed: TlsServed, caplog: pytest.LogCaptureFixture
) -> None:
    with allowed.clear() as client:
        caplog.set_level(logging.WARNING)
        # STARTTLS and a clear-text LIST in one segment: the LIST must not be answered.
        client.send(option_header(c.OPT_STARTTLS, 0) + option_header(c.OPT_LIST, 0))
        assert client.drain_to_eof() == b""
    assert any("after STARTTLS" in r.getMessage() for r in caplog.records)


def test_starttls_with_data_is_invalid(allowed: TlsServed) -> None:
    with allowed.clear() as client:
        [reply] = client.option(c.OPT_STARTTLS, b"x")
        assert reply.type == c.REP_ERR_INVALID
        assert client.go("disk").size == DISK


# -- client certificates -------------------------------------------------------------------


def test_client_identities_come_from_the_verified_certificate(verifying: TlsServed) -> None:
    with verifying.encrypted() as client:
        client.go("disk")
        client.read(0, 512)
        [conn] = verifying.connections()
        assert conn.client_identities == [
            "cert:CN=backup-host",
            "san:DNS:backup-host.example",
        ]


def test_client_without_certificate_is_refused_when_verification_is_on(
    verifying: TlsServed,
) -> None:
    with verifying.clear() as client:
        [reply] = client.option(c.OPT_STARTTLS)
        assert reply.type == c.REP_ACK
        context = verifying.pki.client_context(with_cert=False)
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            _upgrade_and_list(client, context)
    deadline = time.monotonic() + 30
    while verifying.connections():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _upgrade_and_list(client: NbdClient, context: ssl.SSLContext) -> None:
    # TLS 1.3 reports the server's refusal on the first read, not in the handshake.
    client.sock = context.wrap_socket(client.sock, server_hostname="localhost")
    client.send_option(c.OPT_LIST)
    client.read_option_reply()


def test_client_certificate_of_another_ca_is_refused(verifying: TlsServed, tmp_path: Path) -> None:
    other = make_pki(tmp_path / "other")
    context = ssl.create_default_context(cafile=str(verifying.pki.ca_file))
    context.load_cert_chain(str(other.client_cert), str(other.client_key))
    with verifying.clear() as client:
        client.option(c.OPT_STARTTLS)
        with pytest.raises((ssl.SSLError, ConnectionError, EOFError)):
            _upgrade_and_list(client, context)


def test_anonymous_client_has_no_identities(required: TlsServed) -> None:
    with required.encrypted(required.pki.client_context(with_cert=False)) as client:
        client.go("disk")
        client.read(0, 512)
        [conn] = required.connections()
        assert conn.client_identities == []
        assert conn.tls_active


# -- configuration and reload -------------------------------------------------------------------


def test_bad_certificate_files_give_one_line_errors(pki: Pki, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot read the TLS certificate"):
        build_server_context(TlsFiles(tmp_path / "missing.pem", pki.server_key))
    with pytest.raises(InvalidArgument, match="cannot load the TLS certificate"):
        build_server_context(TlsFiles(pki.server_cert, pki.client_key))  # wrong key
    with pytest.raises(InvalidArgument, match="--tls-ca"):
        build_server_context(TlsFiles(pki.server_cert, pki.server_key, verify_client=True))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(InvalidArgument, match="CA file"):
        build_server_context(TlsFiles(pki.server_cert, pki.server_key, garbage))


def test_reload_serves_the_new_certificate_to_new_clients(
    required: TlsServed, tmp_path: Path
) -> None:
    fresh = make_pki(tmp_path / "fresh")
    shutil.copy(fresh.server_cert, required.pki.server_cert)
    shutil.copy(fresh.server_key, required.pki.server_key)
    tls = required.server.tls
    assert tls is not None
    with required.encrypted() as before:  # the old certificate until reload
        before.go("disk")
    required.call(tls.reload)
    with pytest.raises(ssl.SSLCertVerificationError):
        required.encrypted()
    with required.encrypted(fresh.client_context(with_cert=False)) as after:
        assert after.go("disk").size == DISK


def test_failed_reload_keeps_the_old_certificate(required: TlsServed) -> None:
    tls = required.server.tls
    assert tls is not None
    required.pki.server_key.write_text("broken\n")
    with pytest.raises(InvalidArgument):
        required.call(tls.reload)
    with required.encrypted() as client:
        assert client.go("disk").size == DISK


def _server_certificate(server: ssl.SSLContext, client: ssl.SSLContext) -> dict[str, Any]:
    """Handshake the two contexts through memory (no sockets needed for this check);
    the certificate the server presented, as the client verified it."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    theirs = client.wrap_bio(c_in, c_out, server_hostname="localhost")
    ours = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(20):  # a TLS handshake takes a few round trips
        done = 0
        for obj in (theirs, ours):
            try:
                obj.do_handshake()
                done += 1
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
        if done == 2:
            break
    cert = theirs.getpeercert()
    assert cert
    return cert


def test_reload_updates_a_pinned_context_in_place(pki: Pki, tmp_path: Path) -> None:
    # uvicorn keeps the context object it was given: reload must change that object.
    tls = ServerTls(pki.server_files())
    pinned = tls.pinned_context()
    before = _server_certificate(pinned, pki.client_context(with_cert=False))
    fresh = make_pki(tmp_path / "fresh")
    shutil.copy(fresh.server_cert, pki.server_cert)
    shutil.copy(fresh.server_key, pki.server_key)
    tls.reload()
    after = _server_certificate(pinned, fresh.client_context(with_cert=False))
    assert after["serialNumber"] != before["serialNumber"]
    with pytest.raises(ssl.SSLCertVerificationError):
        _server_certificate(pinned, pki.client_context(with_cert=False))


def test_a_client_stalling_in_the_tls_handshake_is_dropped(pki: Pki, tmp_path: Path) -> None:
    served = make_served(tmp_path, pki, TlsMode.REQUIRE, pki.server_files(), 0.5)
    server = next(served)
    try:
        with server.clear() as client:
            [reply] = client.option(c.OPT_STARTTLS)
            assert reply.type == c.REP_ACK
            # No ClientHello: the handshake timer must close the connection.
            assert client.drain_to_eof() == b""
        deadline = time.monotonic() + 30
        while server.connections():
            assert time.monotonic() < deadline
            time.sleep(0.01)
    finally:
        next(served, None)


# -- negotiation rules (no sockets needed) -------------------------------------------------------


@pytest.fixture
def neg_array(tmp_path: Path) -> Iterator[Array]:
    array = Array.open(tmp_path / "neg")
    array.create_lun("disk", MiB)
    try:
        yield array
    finally:
        array.close()


def _negotiator(array: Array, mode: TlsMode) -> Negotiator:
    return Negotiator(resolve=array.find, list_exports=array.luns, tls_mode=mode)


def test_abort_is_served_before_tls_and_oversize_options_are_not(neg_array: Array) -> None:
    neg = _negotiator(neg_array, TlsMode.REQUIRE)
    outcome = neg.handle(c.OPT_ABORT, b"")
    assert outcome.close
    [reply] = outcome.replies
    assert parse_option_reply(reply).type == c.REP_ACK
    # An oversize option says nothing about the export either: TLS first.
    [reply] = neg.handle(c.OPT_INFO, b"", oversize=True).replies
    assert parse_option_reply(reply).type == c.REP_ERR_TLS_REQD
    assert neg.handle(c.OPT_EXPORT_NAME, b"disk").close


def test_allowed_tls_answers_in_clear(neg_array: Array) -> None:
    neg = _negotiator(neg_array, TlsMode.ALLOW)
    assert neg.handle(c.OPT_GO, b"\x00\x00\x00\x04disk\x00\x00").lun is not None
    assert neg.handle(c.OPT_STARTTLS, b"").starttls
