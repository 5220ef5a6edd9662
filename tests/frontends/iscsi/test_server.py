"""The iSCSI server over real sockets: an in-process IscsiServer on a uvloop
loop in a thread, a real array and SCSI target, and the project's initiator
(plus raw sockets for what no well-behaved initiator sends)."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from lunseal.engine.array import Array
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import ChapSecret, InitiatorAccess
from lunseal.frontends.iscsi.login import AUTH_FAILED, FORBIDDEN
from lunseal.frontends.iscsi.server import BATCH_BYTES, QUEUE_CAP, WRITE_HIGH_WATER, IscsiServer
from lunseal.frontends.iscsi.session import MAX_TRANSFER
from lunseal.frontends.scsi.cdb import MAX_TRANSFER_BLOCKS
from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD, LunAccess
from lunseal.frontends.scsi.target import ScsiTarget
from lunseal.host.iscsi.initiator import Initiator, IscsiError, LoginRefused
from tests.frontends.scsi.cdbs import read10, write10

T = TypeVar("T")
MiB = 1 << 20
TARGET = "iqn.2026-12.io.lunseal:lunseal.srv"
TUR = bytes(6)
CHAP = ChapSecret("chap-user", "chap-secret-0123")
MUTUAL = ChapSecret("target-user", "target-secret-45")


class Acl:
    def __init__(self) -> None:
        self.entries: dict[str, InitiatorAccess] | None = None

    def login(self, initiator_name: str) -> InitiatorAccess | None:
        if self.entries is None:
            return InitiatorAccess()
        return self.entries.get(initiator_name)


def on_loop(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=60)


@dataclass
class Served:
    server: IscsiServer
    loop: asyncio.AbstractEventLoop
    port: int
    array: Array
    acl: Acl

    def call(self, fn: Callable[[], T]) -> T:
        async def run() -> T:
            return fn()

        return on_loop(self.loop, run())

    def connections(self) -> int:
        return self.call(lambda: len(self.server.connections))

    def wait_connections(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while self.connections() != n:
            assert time.monotonic() < deadline, f"{self.connections()} connections, not {n}"
            time.sleep(0.01)

    def initiator(self, name: str = "iqn.2026-12.test:host", **login: Any) -> Initiator:
        ini = Initiator.connect("127.0.0.1", self.port, name=name, timeout=30)
        try:
            ini.login(TARGET, **login)
            ini.command(0, TUR)  # the power-on unit attention
        except BaseException:
            ini.close()
            raise
        return ini

    def raw(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@pytest.fixture
def served(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[Served]:
    caplog.set_level(logging.WARNING)
    array = Array.open(tmp_path / "home")
    array.create_lun("disk", 16 * MiB, number=0)
    array.create_lun("other", 4 * MiB, number=1)
    loop = uvloop.new_event_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    thread = threading.Thread(target=loop.run_forever, name="iscsi-test-loop", daemon=True)
    thread.start()
    acl = Acl()
    server = IscsiServer(
        ScsiTarget(array), target_name=TARGET, policy=acl, login_timeout=1.0, keepalive=0.5
    )
    try:

        async def make() -> int:
            return (await server.listen("127.0.0.1", 0))[1]

        port = on_loop(loop, make())
        yield Served(server, loop, port, array, acl)
    finally:
        on_loop(loop, server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        array.close()
    assert errors == [], "the event loop reported unhandled errors"


def login_raw(sock: socket.socket, name: str = "iqn.2026-12.test:raw") -> None:
    sock.sendall(
        p.login_request(
            isid=b"\x80" + bytes(5),
            tsih=0,
            itt=0,
            cid=0,
            cmdsn=1,
            exp_statsn=0,
            csg=1,
            nsg=3,
            transit=True,
            data=text.encode({"InitiatorName": name, "TargetName": TARGET}),
        )
    )
    dec = p.PduDecoder(expect=p.TARGET_OPCODES)
    while (pdu := dec.next_pdu()) is None:
        dec.receive_data(sock.recv(65536))
    assert pdu.opcode == p.LOGIN_RESPONSE
    assert pdu.bhs[36] == 0


def read_until_closed(sock: socket.socket) -> bytes:
    got = b""
    while chunk := sock.recv(65536):
        got += chunk
    return got


def test_write_and_read_back_through_the_lun(served: Served) -> None:
    with served.initiator() as ini:
        data = bytes(range(256)) * 1024  # 256 KiB: immediate, unsolicited and R2T
        assert ini.command(0, write10(100, 512), data_out=data).status == GOOD
        r = ini.command(0, read10(100, 512), read_length=len(data))
        assert r.status == GOOD
        assert r.data == data
        assert ini.logout() == 0
    assert served.array.lun("disk").read(100 * 512, len(data)) == data


def test_digests_end_to_end(served: Served) -> None:
    with served.initiator(header_digest=True, data_digest=True) as ini:
        assert ini.session.keys["HeaderDigest"] == "CRC32C"
        assert ini.session.keys["DataDigest"] == "CRC32C"
        assert ini.command(0, write10(0, 16), data_out=b"d" * 8192).status == GOOD
        assert ini.command(0, read10(0, 16), read_length=8192).data == b"d" * 8192


def test_staged_login_and_one_pdu_login(served: Served) -> None:
    for one in (False, True):
        with served.initiator(one_pdu=one) as ini:
            assert ini.session.tsih != 0
            assert ini.nop(b"ping") == b"ping"


def test_discovery(served: Served) -> None:
    with Initiator.connect("127.0.0.1", served.port) as ini:
        ini.login(None)
        assert ini.discover() == [(TARGET, f"127.0.0.1:{served.port},1")]


def test_malformed_pdu_closes_only_its_connection(served: Served) -> None:
    with served.initiator() as good:
        bad = served.raw()
        login_raw(bad)
        served.wait_connections(2)
        header = bytearray(p.nop_out(itt=1, cmdsn=1, exp_statsn=0))
        header[0] = 0x1F  # no such opcode
        bad.sendall(bytes(header))
        got = read_until_closed(bad)
        dec = p.PduDecoder(expect=p.TARGET_OPCODES)
        dec.receive_data(got)
        reject = dec.next_pdu()
        assert reject is not None
        assert reject.opcode == p.REJECT
        assert reject.data[:1] == b"\x1f"
        bad.close()
        served.wait_connections(1)
        assert good.command(0, TUR).status == GOOD
        assert good.nop(b"still here") == b"still here"


def test_oversize_data_segment_closes_only_its_connection(served: Served) -> None:
    with served.initiator() as good:
        bad = served.raw()
        login_raw(bad)
        # Announce 16 MiB of data without sending it: refused from the header.
        header = bytearray(p.nop_out(itt=1, cmdsn=1, exp_statsn=0))
        header[5:8] = (1 << 24 - 1).to_bytes(3, "big")
        bad.sendall(bytes(header))
        assert read_until_closed(bad)[0] & 0x3F == p.REJECT
        bad.close()
        assert good.command(0, TUR).status == GOOD


def test_garbage_before_login_closes_that_connection(served: Served) -> None:
    with served.initiator() as good:
        bad = served.raw()
        bad.sendall(b"GET / HTTP/1.1\r\n\r\n" + bytes(64))
        read_until_closed(bad)
        bad.close()
        assert good.command(0, TUR).status == GOOD


def test_login_timeout(served: Served) -> None:
    sock = served.raw()
    served.wait_connections(1)
    start = time.monotonic()
    assert read_until_closed(sock) == b""
    assert time.monotonic() - start < 20
    sock.close()


def test_keepalive_ping_and_silent_initiator_is_closed(served: Served) -> None:
    sock = served.raw()
    login_raw(sock)
    dec = p.PduDecoder(expect=p.TARGET_OPCODES)
    while (pdu := dec.next_pdu()) is None:
        dec.receive_data(sock.recv(65536))
    assert pdu.opcode == p.NOP_IN
    assert pdu.itt == p.RESERVED_TAG
    assert pdu.ttt != p.RESERVED_TAG
    # Never answered: the connection goes.
    read_until_closed(sock)
    sock.close()
    served.wait_connections(0)


def test_answered_pings_keep_the_connection(served: Served) -> None:
    with served.initiator() as ini:
        # recv_pdu answers pings on the way; idle for several keep-alive periods.
        ini.sock.settimeout(0.3)
        for _ in range(6):
            with pytest.raises(IscsiError, match="in time"):
                ini.recv_pdu()
        ini.sock.settimeout(30)
        assert ini.command(0, TUR).status == GOOD


def test_two_sessions_of_one_initiator_and_two_initiators(served: Served) -> None:
    a1 = served.initiator("iqn.2026-12.test:a")
    a2 = served.initiator("iqn.2026-12.test:a")  # another ISID: another session
    b = served.initiator("iqn.2026-12.test:b")
    try:
        assert a1.command(0, write10(0, 1), data_out=b"1" * 512).status == GOOD
        assert b.command(0, read10(0, 1), read_length=512).data == b"1" * 512
        assert a2.command(0, read10(0, 1), read_length=512).data == b"1" * 512
        assert served.connections() == 3
    finally:
        for ini in (a1, a2, b):
            ini.close()


def test_same_isid_reinstates_the_session(served: Served) -> None:
    old = served.initiator("iqn.2026-12.test:same")
    new = Initiator.connect("127.0.0.1", served.port, name="iqn.2026-12.test:same", isid=old.isid)
    try:
        new.login(TARGET)
        with pytest.raises(IscsiError):
            old.command(0, TUR)
        new.command(0, TUR)
        assert new.command(0, TUR).status == GOOD
    finally:
        old.close()
        new.close()


def test_chap_one_way_mutual_and_failures(served: Served) -> None:
    served.acl.entries = {
        "iqn.2026-12.test:chap": InitiatorAccess(chap=CHAP),
        "iqn.2026-12.test:mutual": InitiatorAccess(chap=CHAP, mutual=MUTUAL),
    }
    with served.initiator("iqn.2026-12.test:chap", chap=CHAP) as ini:
        assert ini.command(0, TUR).status == GOOD
    with served.initiator("iqn.2026-12.test:mutual", chap=CHAP, mutual=MUTUAL) as ini:
        assert ini.command(0, TUR).status == GOOD
    with pytest.raises(LoginRefused) as info:
        served.initiator("iqn.2026-12.test:chap", chap=ChapSecret(CHAP.user, "wrong-secret-0000"))
    assert info.value.status == AUTH_FAILED
    with pytest.raises(LoginRefused) as info:
        served.initiator("iqn.2026-12.test:chap")  # no CHAP at all
    assert info.value.status == AUTH_FAILED
    with pytest.raises(IscsiError, match="mutual"):
        served.initiator(
            "iqn.2026-12.test:mutual", chap=CHAP, mutual=ChapSecret(MUTUAL.user, "other-secret-999")
        )
    with pytest.raises(LoginRefused) as info:
        served.initiator("iqn.2026-12.test:stranger")
    assert info.value.status == FORBIDDEN
    served.wait_connections(0)


def test_lun_masking(served: Served) -> None:
    served.acl.entries = {
        "iqn.2026-12.test:masked": InitiatorAccess(luns=LunAccess(visible=frozenset({1})))
    }
    with Initiator.connect("127.0.0.1", served.port, name="iqn.2026-12.test:masked") as ini:
        ini.login(TARGET)
        report = ini.command(0, bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]), read_length=4096)
        assert report.status == GOOD
        assert int.from_bytes(report.data[:4], "big") == 8  # one LUN listed
        assert report.data[8:16] == p.lun_field(1)
        assert ini.command(0, TUR).status != GOOD  # LUN 0 is not there for it


def test_max_connections(served: Served) -> None:
    served.call(lambda: setattr(served.server, "max_connections", 1))
    with served.initiator():
        extra = served.raw()
        assert read_until_closed(extra) == b""
        extra.close()


def test_write_changes_the_state_token(served: Served) -> None:
    """Writes go through the LUN's gate: the state moves (C2)."""
    lun = served.array.lun("disk")
    tracker = served.array.tracker("disk")
    lun.run(lambda: tracker.acquire("backup"))
    with served.initiator() as ini:
        before = lun.run(tracker.token)
        assert ini.command(0, read10(0, 1), read_length=512).status == GOOD
        assert lun.run(tracker.token) == before  # a read changes nothing
        assert ini.command(0, write10(0, 1), data_out=b"s" * 512).status == GOOD
        assert lun.run(tracker.token) != before


def test_block_limits_promise_no_more_than_the_transport_buffers() -> None:
    """The SCSI layer refuses transfers beyond its BLOCK LIMITS; the transport
    holds at most MAX_TRANSFER per command (and refuses more itself)."""
    assert MAX_TRANSFER_BLOCKS * 512 <= MAX_TRANSFER


def test_a_read_beyond_the_transfer_limit_is_refused(served: Served) -> None:
    blocks = MAX_TRANSFER_BLOCKS + 8
    served.call(lambda: served.array.create_lun("big", 64 * MiB, number=2))
    with served.initiator() as ini:
        ini.command(2, bytes(6))  # the new LUN's unit attention
        cdb = bytes([0x88, 0]) + (0).to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)
        r = ini.command(2, cdb, read_length=blocks * 512)
        assert r.status == CHECK_CONDITION
        assert r.sense[12] == 0x24  # INVALID FIELD IN CDB
        assert r.data == b""
        assert ini.command(2, read10(0, 8), read_length=4096).status == GOOD


def test_a_client_that_never_reads_is_bounded_and_others_carry_on(served: Served) -> None:
    """128 reads of 1 MiB whose answers are never read: the connection stops
    reading at its cap instead of queueing 128 MiB; another session is served."""
    with served.initiator() as good:
        hog = served.raw()
        hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
        login_raw(hog, "iqn.2026-12.test:hog")
        commands = b"".join(
            p.scsi_command(
                itt=i + 1,
                lun=p.lun_field(0),
                cdb=read10((i % 8) * 2048, 2048),
                cmdsn=1 + i,
                exp_statsn=0,
                expected_length=1 << 20,
                read=True,
            )
            for i in range(128)
        )
        hog.sendall(commands)
        conns = served.call(
            lambda: [
                c for c in served.server.connections if c.peer.endswith(str(hog.getsockname()[1]))
            ]
        )
        (conn,) = conns
        deadline = time.monotonic() + 30
        while not served.call(lambda: conn._reading_paused):
            assert time.monotonic() < deadline, "the connection never stopped reading"
            time.sleep(0.02)
        assert good.command(0, read10(0, 8), read_length=4096).status == GOOD
        cap = QUEUE_CAP + BATCH_BYTES + (1 << 20) + WRITE_HIGH_WATER
        assert served.call(lambda: conn.peak_queued) <= cap
        hog.close()
        served.wait_connections(1)


def test_an_acl_change_closes_sessions_that_lost_their_access(served: Served) -> None:
    keep = served.initiator("iqn.2026-12.test:keep")
    lose = served.initiator("iqn.2026-12.test:lose")
    try:
        served.acl.entries = {"iqn.2026-12.test:keep": InitiatorAccess()}
        served.call(served.server.access_changed)
        served.wait_connections(1)
        with pytest.raises(IscsiError):
            lose.command(0, TUR)
        assert keep.command(0, TUR).status == GOOD  # same access as before: kept
        with pytest.raises(LoginRefused):
            served.initiator("iqn.2026-12.test:lose")
    finally:
        keep.close()
        lose.close()


class BatchCounter:
    """A LUN batch hook: counts the batches (worker jobs) the LUN ran."""

    def __init__(self) -> None:
        self.batches = 0

    def begin_batch(self) -> None:
        self.batches += 1

    def end_batch(self) -> None:
        pass


def test_commands_received_while_the_worker_is_busy_join_its_next_job(served: Served) -> None:
    """Receives that arrive before the worker started the connection's last job
    are added to it: one hand-off, one pair of stamps, one reply wake-up for all,
    and the answers still come back in order."""
    lun = served.array.lun("disk")
    assert lun.worker is not None
    counter = BatchCounter()
    lun.batch_hooks.append(counter)
    busy, release = threading.Event(), threading.Event()

    def hold() -> None:
        busy.set()
        assert release.wait(60)

    count = 6
    sock = served.raw()
    try:
        login_raw(sock)
        (conn,) = served.call(lambda: list(served.server.connections))
        lun.worker.post(hold)
        assert busy.wait(30)
        for i in range(count):  # one receive each: the server has parsed it before the next
            command = p.scsi_command(
                itt=i + 1,
                lun=p.lun_field(0),
                cdb=read10(i * 8, 8),
                cmdsn=1 + i,
                exp_statsn=0,
                expected_length=4096,
                read=True,
            )
            sock.sendall(command)
            for _ in range(3000):  # bounded by count, not by the machine's speed
                if served.call(lambda: conn._inflight_bytes) == (i + 1) * 4096:
                    break
                time.sleep(0.01)
            assert served.call(lambda: conn._inflight_bytes) == (i + 1) * 4096
        release.set()
        dec = p.PduDecoder(expect=p.TARGET_OPCODES)
        done: list[int] = []
        while len(done) < count:
            pdu = dec.next_pdu()
            if pdu is None:
                dec.receive_data(sock.recv(65536))
            elif pdu.bhs[1] & 0x01 or pdu.opcode == p.SCSI_RESPONSE:  # status in it
                done.append(pdu.u32(16))
        assert done == list(range(1, count + 1))
        assert counter.batches == 1  # one job ran all six commands
    finally:
        release.set()
        sock.close()
