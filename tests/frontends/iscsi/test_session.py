"""The iSCSI connection/session machine, sans I/O, in front of a real SCSI
target on a real array: windowing, data in and out, residuals, task
management, keep-alive, text and logout."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import session as s
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import OpenAccess
from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD
from lunseal.frontends.scsi.target import ScsiTarget
from tests.frontends.scsi.cdbs import read10, write10
from tests.support.arrays import Arrays

MiB = 1 << 20
TARGET = "iqn.2026-12.io.lunseal:lunseal.test"
TUR = bytes(6)
READ_CAPACITY_10 = bytes([0x25]) + bytes(9)


class Harness:
    """Drives a Connection like the server does, running work inline on the LUN's worker."""

    def __init__(self, array: Array, **keys: str) -> None:
        self.array = array
        self.target = ScsiTarget(array)
        self.conn = s.Connection(
            self.target,
            target_name=TARGET,
            policy=OpenAccess(),
            portal="127.0.0.1:3260",
            new_tsih=lambda: 1,
        )
        self.cmdsn = 1
        self.itt = 0
        self.decoder = p.PduDecoder(max_data=1 << 24, expect=p.TARGET_OPCODES)
        self.held: list[s.Work] = []
        self.hold = False
        offers = {
            "InitiatorName": "iqn.2026-12.test:host",
            "TargetName": TARGET,
            "MaxRecvDataSegmentLength": "8192",
            "InitialR2T": "No",
            "ImmediateData": "Yes",
            "FirstBurstLength": "4096",
            "MaxBurstLength": "16384",
        } | keys
        self.feed(
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
                data=text.encode(offers),
            )
        )
        (resp,) = self.take()
        assert resp.opcode == p.LOGIN_RESPONSE
        assert resp.bhs[36] == 0, resp.bhs[36:38].hex()
        assert self.conn.full_feature
        self.login_answers = dict(text.parse(resp.data))
        self.attach()

    def attach(self) -> None:
        r = self.command(TUR)  # the power-on unit attention of a new nexus
        assert r[-1].bhs[3] == CHECK_CONDITION

    def feed(self, wire: bytes) -> None:
        dec = self.conn.decoder
        dec.receive_data(wire)
        while (pdu := dec.next_pdu()) is not None:
            self.conn.receive(pdu)
            self.run_work()

    def run_work(self) -> None:
        work, self.conn.work = self.conn.work, []
        if self.hold:
            self.held += work
            return
        for item in work:
            self.finish(item)

    def finish(self, item: s.Work) -> None:
        if isinstance(item, s.TmfWork):
            item.action()
            self.conn.tmf_done(item)
            return
        lun = self.target.lun(self.conn.nexus, item.task.lun) if item.task.lun >= 0 else None  # type: ignore[arg-type]
        result = (
            lun.run(lambda: self.target.execute(item.command))
            if lun
            else self.target.execute(item.command)
        )
        data = result.data
        if not isinstance(data, bytes | bytearray | memoryview):
            result.data = self.array.luns()[0].read(data.offset, data.length)
        self.conn.command_done(item.task, result)

    def take(self) -> list[p.Pdu]:
        out, self.conn.out = self.conn.out, []
        for wire in out:
            self.decoder.receive_data(wire)
        got = []
        while (pdu := self.decoder.next_pdu()) is not None:
            got.append(pdu)
        return got

    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def send_command(
        self,
        cdb: bytes,
        *,
        edtl: int,
        read: bool = False,
        data: bytes = b"",
        write: bool = False,
        final: bool = True,
        cmdsn: int | None = None,
        immediate: bool = False,
    ) -> int:
        itt = self.next_itt()
        self.feed(
            p.scsi_command(
                itt=itt,
                lun=p.lun_field(0),
                cdb=cdb,
                cmdsn=self.cmdsn if cmdsn is None else cmdsn,
                exp_statsn=0,
                expected_length=edtl,
                read=read,
                write=write or bool(data),
                final=final,
                data=data,
                immediate=immediate,
            )
        )
        if cmdsn is None and not immediate:
            self.cmdsn += 1
        return itt

    def command(self, cdb: bytes, edtl: int = 0, read: bool = False) -> list[p.Pdu]:
        self.send_command(cdb, edtl=edtl, read=read)
        return self.take()


@pytest.fixture
def array(tmp_path: Path) -> Iterator[Array]:
    arrays = Arrays(tmp_path / "data")
    a = arrays.open()
    a.create_lun("disk", 16 * MiB, number=0)
    try:
        yield a
    finally:
        arrays.close()


def status_of(pdus: list[p.Pdu]) -> int:
    last = pdus[-1]
    assert last.opcode in (p.SCSI_RESPONSE, p.DATA_IN)
    if last.opcode == p.DATA_IN:
        assert last.flags & p.F_STATUS
    return last.bhs[3]


def test_response_with_sense_and_statsn_sequence(array: Array) -> None:
    h = Harness(array)
    first = h.command(TUR)
    second = h.command(TUR)
    assert status_of(first) == status_of(second) == GOOD
    assert second[0].statsn == (first[0].statsn + 1) % (1 << 32)
    assert second[0].exp_cmdsn == h.cmdsn


def test_read_split_by_initiator_limit_with_status_in_last_data_in(array: Array) -> None:
    lun = array.luns()[0]
    pattern = bytes(range(256)) * 128  # 32 KiB
    lun.write(0, pattern)
    h = Harness(array)
    pdus = h.command(read10(0, 64), edtl=len(pattern), read=True)
    assert all(x.opcode == p.DATA_IN for x in pdus)
    assert [x.u32(36) for x in pdus] == list(range(4))  # DataSN
    assert [x.u32(40) for x in pdus] == [0, 8192, 16384, 24576]  # offsets
    assert all(len(x.data) <= 8192 for x in pdus)
    assert b"".join(x.data for x in pdus) == pattern
    assert [bool(x.flags & p.F_STATUS) for x in pdus] == [False, False, False, True]
    # F marks the end of each MaxBurstLength (16 KiB) sequence.
    assert [bool(x.flags & p.F_FINAL) for x in pdus] == [False, True, False, True]
    assert pdus[-1].bhs[3] == GOOD


@pytest.mark.parametrize(
    ("edtl", "flag", "residual", "sent"),
    [
        (0, p.F_OVERFLOW, 512, 0),
        (200, p.F_OVERFLOW, 312, 200),
        (10000, p.F_UNDERFLOW, 9488, 512),
        (512, 0, 0, 512),
    ],
)
def test_read_residuals(array: Array, edtl: int, flag: int, residual: int, sent: int) -> None:
    h = Harness(array)
    pdus = h.command(read10(0, 1), edtl=edtl, read=edtl > 0)
    last = pdus[-1]
    assert last.flags & (p.F_OVERFLOW | p.F_UNDERFLOW) == flag
    assert last.u32(44) == residual
    assert sum(len(x.data) for x in pdus if x.opcode == p.DATA_IN) == sent


def test_write_immediate_unsolicited_and_solicited(array: Array) -> None:
    """32 KiB: 2 KiB immediate, unsolicited Data-Out to FirstBurstLength (4 KiB),
    then R2Ts of MaxBurstLength (16 KiB) for the rest."""
    h = Harness(array)
    data = bytes((i * 7) & 0xFF for i in range(32768))
    itt = h.send_command(write10(8, 64), edtl=len(data), data=data[:2048], final=False)
    assert h.take() == []
    h.feed(
        p.data_out(
            itt=itt,
            ttt=p.RESERVED_TAG,
            exp_statsn=0,
            datasn=0,
            offset=2048,
            data=data[2048:4096],
            final=True,
        )
    )
    r2ts = h.take()
    assert [x.opcode for x in r2ts] == [p.R2T]
    assert (r2ts[0].u32(40), r2ts[0].u32(44), r2ts[0].u32(36)) == (4096, 16384, 0)
    ttt = r2ts[0].ttt
    for n, off in enumerate(range(4096, 4096 + 16384, 8192)):
        h.feed(
            p.data_out(
                itt=itt,
                ttt=ttt,
                exp_statsn=0,
                datasn=n,
                offset=off,
                data=data[off : off + 8192],
                final=off + 8192 == 20480,
            )
        )
    second = h.take()
    assert [x.opcode for x in second] == [p.R2T]
    assert (second[0].u32(40), second[0].u32(44), second[0].u32(36)) == (20480, 12288, 1)
    h.feed(
        p.data_out(
            itt=itt,
            ttt=second[0].ttt,
            exp_statsn=0,
            datasn=0,
            offset=20480,
            data=data[20480:],
            final=True,
        )
    )
    done = h.take()
    assert status_of(done) == GOOD
    assert done[-1].u32(36) == 2  # ExpDataSN counts the R2Ts
    assert array.luns()[0].read(8 * 512, len(data)) == data


def test_write_edtl_longer_than_cdb_writes_the_cdb_length(array: Array) -> None:
    h = Harness(array)
    h.send_command(write10(0, 1), edtl=1024, data=b"b" * 1024)
    resp = h.take()
    assert status_of(resp) == GOOD
    assert resp[-1].flags & p.F_UNDERFLOW
    assert resp[-1].u32(44) == 512
    assert array.luns()[0].read(0, 1024) == b"b" * 512 + bytes(512)


def test_bad_data_sn_rejects_and_aborts_only_that_task(array: Array) -> None:
    h = Harness(array)
    itt = h.send_command(write10(0, 2), edtl=1024, write=True, final=False)
    h.feed(
        p.data_out(
            itt=itt,
            ttt=p.RESERVED_TAG,
            exp_statsn=0,
            datasn=5,
            offset=0,
            data=b"x" * 512,
            final=False,
        )
    )
    out = h.take()
    assert [x.opcode for x in out] == [p.REJECT]
    assert out[0].bhs[2] == p.REJECT_PROTOCOL_ERROR
    assert out[0].data[:1] == bytes([p.DATA_OUT])
    # The rest of the task's data is ignored, no response for it ever comes,
    # and the connection carries on.
    h.feed(
        p.data_out(
            itt=itt,
            ttt=p.RESERVED_TAG,
            exp_statsn=0,
            datasn=1,
            offset=512,
            data=b"x" * 512,
            final=True,
        )
    )
    assert h.take() == []
    assert not h.conn.closing
    assert status_of(h.command(TUR)) == GOOD
    assert array.luns()[0].read(0, 1024) == bytes(1024)


@pytest.mark.parametrize("offset", [512, 0x7FFF])
def test_data_out_at_a_wrong_offset_is_rejected(array: Array, offset: int) -> None:
    h = Harness(array)
    itt = h.send_command(write10(0, 2), edtl=1024, write=True, final=False)
    h.feed(
        p.data_out(
            itt=itt,
            ttt=p.RESERVED_TAG,
            exp_statsn=0,
            datasn=0,
            offset=offset,
            data=b"x" * 512,
            final=True,
        )
    )
    assert [x.opcode for x in h.take()] == [p.REJECT]


def test_cmdsn_outside_the_window_is_ignored(array: Array) -> None:
    h = Harness(array)
    max_cmdsn = h.command(TUR)[-1].max_cmdsn
    h.send_command(TUR, edtl=0, cmdsn=max_cmdsn + 1)  # too high
    h.send_command(TUR, edtl=0, cmdsn=h.cmdsn - 1)  # too low (already used)
    assert h.take() == []
    assert status_of(h.command(TUR)) == GOOD  # the expected CmdSN still works


def test_window_shrinks_with_outstanding_tasks(array: Array) -> None:
    h = Harness(array)
    before = h.command(TUR)[-1]
    assert (before.max_cmdsn - before.exp_cmdsn) % (1 << 32) == s.QUEUE_DEPTH - 1
    h.hold = True
    for _ in range(3):
        h.send_command(TUR, edtl=0)
    h.hold = False
    h.conn.ping()  # any PDU now carries the window
    (ping,) = h.take()
    assert (ping.max_cmdsn - ping.exp_cmdsn) % (1 << 32) == s.QUEUE_DEPTH - 1 - 3


def test_immediate_command_does_not_advance_cmdsn(array: Array) -> None:
    h = Harness(array)
    h.send_command(TUR, edtl=0, immediate=True)
    resp = h.take()
    assert status_of(resp) == GOOD
    assert resp[-1].exp_cmdsn == h.cmdsn


def test_nop_out_echo_and_target_ping(array: Array) -> None:
    h = Harness(array)
    h.feed(p.nop_out(itt=77, cmdsn=h.cmdsn, exp_statsn=0, data=b"echo me"))
    (nop,) = h.take()
    assert nop.opcode == p.NOP_IN
    assert nop.itt == 77
    assert nop.data == b"echo me"
    assert h.conn.ping()
    (ping,) = h.take()
    assert ping.itt == p.RESERVED_TAG
    assert ping.ttt != p.RESERVED_TAG
    assert not h.conn.ping()  # unanswered: the caller closes
    h.feed(p.nop_out(itt=p.RESERVED_TAG, ttt=ping.ttt, cmdsn=h.cmdsn, exp_statsn=0))
    assert h.take() == []  # the answer to a ping gets none
    assert h.conn.ping()


def test_abort_task_waiting_for_data_drops_its_response(array: Array) -> None:
    h = Harness(array)
    itt = h.send_command(write10(0, 64), edtl=32768, write=True, final=False)
    h.feed(
        p.task_mgmt(
            function=s.TMF_ABORT_TASK,
            itt=500,
            cmdsn=h.cmdsn,
            exp_statsn=0,
            referenced_itt=itt,
            ref_cmdsn=h.cmdsn - 1,
        )
    )
    (resp,) = h.take()
    assert resp.opcode == p.TASK_MGMT_RESPONSE
    assert resp.bhs[2] == s.TMF_COMPLETE
    h.feed(
        p.data_out(
            itt=itt,
            ttt=p.RESERVED_TAG,
            exp_statsn=0,
            datasn=0,
            offset=0,
            data=b"z" * 4096,
            final=True,
        )
    )
    assert h.take() == []
    assert array.luns()[0].read(0, 4096) == bytes(4096)


def test_abort_task_running_drops_its_response(array: Array) -> None:
    h = Harness(array)
    h.hold = True
    itt = h.send_command(TUR, edtl=0)
    h.feed(
        p.task_mgmt(
            function=s.TMF_ABORT_TASK,
            itt=501,
            cmdsn=h.cmdsn,
            exp_statsn=0,
            referenced_itt=itt,
            ref_cmdsn=h.cmdsn - 1,
        )
    )
    h.hold = False
    for item in h.held:
        h.finish(item)
    out = h.take()
    assert [x.opcode for x in out] == [p.TASK_MGMT_RESPONSE]


def test_abort_unknown_task(array: Array) -> None:
    h = Harness(array)
    h.feed(
        p.task_mgmt(
            function=s.TMF_ABORT_TASK, itt=502, cmdsn=h.cmdsn, exp_statsn=0, referenced_itt=12345
        )
    )
    assert h.take()[0].bhs[2] == s.TMF_NO_TASK


@pytest.mark.parametrize(
    ("function", "lun", "response"),
    [
        (s.TMF_LUN_RESET, 0, s.TMF_COMPLETE),
        (s.TMF_LUN_RESET, 9, s.TMF_NO_LUN),
        (s.TMF_ABORT_TASK_SET, 0, s.TMF_COMPLETE),
        (s.TMF_TARGET_WARM_RESET, 0, s.TMF_COMPLETE),
        (s.TMF_TARGET_COLD_RESET, 0, s.TMF_UNSUPPORTED),
        (s.TMF_CLEAR_ACA, 0, s.TMF_UNSUPPORTED),
        (s.TMF_TASK_REASSIGN, 0, s.TMF_REASSIGN_UNSUPPORTED),
    ],
)
def test_task_management_functions(array: Array, function: int, lun: int, response: int) -> None:
    h = Harness(array)
    h.feed(
        p.task_mgmt(function=function, itt=600, cmdsn=h.cmdsn, exp_statsn=0, lun=p.lun_field(lun))
    )
    (resp,) = h.take()
    assert resp.bhs[2] == response


def test_lun_reset_raises_a_unit_attention(array: Array) -> None:
    h = Harness(array)
    h.feed(p.task_mgmt(function=s.TMF_LUN_RESET, itt=601, cmdsn=h.cmdsn, exp_statsn=0))
    h.take()
    assert status_of(h.command(TUR)) == CHECK_CONDITION


def test_logout_waits_for_running_commands(array: Array) -> None:
    h = Harness(array)
    h.hold = True
    h.send_command(TUR, edtl=0)
    h.feed(p.logout_request(itt=700, cmdsn=h.cmdsn, exp_statsn=0))
    assert h.take() == []
    assert not h.conn.closing
    h.hold = False
    for item in h.held:
        h.finish(item)
    out = h.take()
    assert [x.opcode for x in out] == [p.SCSI_RESPONSE, p.LOGOUT_RESPONSE]
    assert h.conn.closing


def test_send_targets_in_a_normal_session(array: Array) -> None:
    h = Harness(array)
    h.feed(
        p.text_request(
            itt=800,
            cmdsn=h.cmdsn,
            exp_statsn=0,
            data=b"SendTargets=All\0X-y=1\0HeaderDigest=None\0",
        )
    )
    (resp,) = h.take()
    got = text.parse(resp.data)
    assert ("TargetName", TARGET) in got
    assert ("TargetAddress", "127.0.0.1:3260,1") in got
    assert ("X-y", "NotUnderstood") in got
    assert ("HeaderDigest", "Reject") in got  # login-only
    assert resp.flags & p.F_FINAL
    assert resp.ttt == p.RESERVED_TAG


def test_discovery_session_rejects_scsi_commands(array: Array) -> None:
    target = ScsiTarget(array)
    conn = s.Connection(
        target, target_name=TARGET, policy=OpenAccess(), portal="127.0.0.1:3260", new_tsih=lambda: 2
    )
    conn.decoder.receive_data(
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
            data=text.encode({"InitiatorName": "iqn.2026-12.test:d", "SessionType": "Discovery"}),
        )
        + p.scsi_command(
            itt=1, lun=p.lun_field(0), cdb=TUR, cmdsn=1, exp_statsn=0, expected_length=0
        )
    )
    while (pdu := conn.decoder.next_pdu()) is not None:
        conn.receive(pdu)
    dec = p.PduDecoder(expect=p.TARGET_OPCODES)
    for wire in conn.out:
        dec.receive_data(wire)
    login = dec.next_pdu()
    reject = dec.next_pdu()
    assert login is not None
    assert reject is not None
    assert reject.opcode == p.REJECT
    assert reject.bhs[2] == p.REJECT_NOT_SUPPORTED
    assert conn.work == []


def test_non_login_pdu_before_login_closes(array: Array) -> None:
    conn = s.Connection(
        ScsiTarget(array), target_name=TARGET, policy=OpenAccess(), portal="x", new_tsih=lambda: 3
    )
    conn.decoder.receive_data(p.nop_out(itt=1, cmdsn=1, exp_statsn=0))
    pdu = conn.decoder.next_pdu()
    assert pdu is not None
    conn.receive(pdu)
    assert conn.closing
    assert conn.work == []


def test_too_long_a_transfer_is_refused_without_data(array: Array) -> None:
    h = Harness(array)
    blocks = (s.MAX_TRANSFER // 512) + 8
    cdb = bytes([0x8A, 0]) + (0).to_bytes(8, "big") + blocks.to_bytes(4, "big") + bytes(2)
    h.send_command(cdb, edtl=blocks * 512, write=True)
    resp = h.take()
    assert [x.opcode for x in resp] == [p.SCSI_RESPONSE]
    assert resp[0].bhs[3] == CHECK_CONDITION
    assert resp[0].data[2 + 12] == 0x24  # INVALID FIELD IN CDB


def test_data_out_budget_holds_r2ts_back(array: Array, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(s, "DATA_OUT_BUDGET", 64 << 10)
    h = Harness(array, InitialR2T="Yes")
    a = h.send_command(write10(0, 128), edtl=64 << 10, write=True)
    b = h.send_command(write10(128, 128), edtl=64 << 10, write=True)
    first = h.take()
    assert [(x.opcode, x.itt) for x in first] == [(p.R2T, a)]  # b waits for buffer room
    off = 0
    for n in range(4):
        r2t = first[-1] if n == 0 else h.take()[-1]
        assert r2t.opcode == p.R2T
        length = r2t.u32(44)
        for dsn, chunk in enumerate(range(r2t.u32(40), r2t.u32(40) + length, 8192)):
            h.feed(
                p.data_out(
                    itt=a,
                    ttt=r2t.ttt,
                    exp_statsn=0,
                    datasn=dsn,
                    offset=chunk,
                    data=bytes(8192),
                    final=chunk + 8192 == r2t.u32(40) + length,
                )
            )
        off += length
        if off >= 64 << 10:
            break
    after = h.take()
    # a is done and its buffer freed: b gets its R2T.
    assert sorted((x.opcode, x.itt) for x in after) == [(p.SCSI_RESPONSE, a), (p.R2T, b)]


def test_text_in_pieces_and_its_bound(array: Array) -> None:
    h = Harness(array)
    h.feed(p.text_request(itt=900, cmdsn=h.cmdsn, exp_statsn=0, data=b"SendTar", final=False))
    h.cmdsn += 1
    (part,) = h.take()
    assert part.opcode == p.TEXT_RESPONSE
    assert not part.flags & p.F_FINAL
    assert part.ttt != p.RESERVED_TAG  # the initiator continues with this tag
    h.feed(p.text_request(itt=900, cmdsn=h.cmdsn, exp_statsn=0, data=b"gets=All\0", ttt=part.ttt))
    h.cmdsn += 1
    (whole,) = h.take()
    assert ("TargetName", TARGET) in text.parse(whole.data)
    for _ in range(9):  # 72 KiB of text that never ends
        h.feed(p.text_request(itt=901, cmdsn=h.cmdsn, exp_statsn=0, data=b"K" * 8192, final=False))
        h.cmdsn += 1
    assert h.conn.closing
    assert h.take()[-1].opcode == p.REJECT
