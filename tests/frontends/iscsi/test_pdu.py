"""The iSCSI PDU codec: every PDU both ways, whole, byte by byte and with
trailing bytes; digests; the bounds that close a connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

import pytest
from crc32c import crc32c

from lunseal.errors import ProtocolError
from lunseal.frontends.iscsi import pdu as p

D = p.Digests(header=True, data=True)


class Sns(TypedDict):
    statsn: int
    exp_cmdsn: int
    max_cmdsn: int


SN: Sns = {"statsn": 7, "exp_cmdsn": 8, "max_cmdsn": 9}

# (name, builder, expected opcode, the direction's decoder opcodes)
TARGET_PDUS: list[tuple[str, Callable[[p.Digests], bytes], int]] = [
    ("nop_in", lambda d: p.nop_in(itt=1, ttt=2, data=b"ping", digests=d, **SN), p.NOP_IN),
    (
        "scsi_response",
        lambda d: p.scsi_response(itt=3, status=2, sense=b"\x70" + bytes(17), digests=d, **SN),
        p.SCSI_RESPONSE,
    ),
    (
        "task_mgmt_response",
        lambda d: p.task_mgmt_response(itt=4, response=1, digests=d, **SN),
        p.TASK_MGMT_RESPONSE,
    ),
    (
        "login_response",
        lambda _d: p.login_response(flags=0x87, isid=bytes(6), tsih=5, itt=6, data=b"A=B\0", **SN),
        p.LOGIN_RESPONSE,
    ),
    (
        "text_response",
        lambda d: p.text_response(
            flags=0x80, itt=7, ttt=p.RESERVED_TAG, data=b"X=1\0", digests=d, **SN
        ),
        p.TEXT_RESPONSE,
    ),
    (
        "data_in",
        lambda d: b"".join(
            p.data_in(
                itt=8,
                datasn=0,
                offset=0,
                data=b"abc",
                exp_cmdsn=1,
                max_cmdsn=2,
                status=0,
                digests=d,
            )
        ),
        p.DATA_IN,
    ),
    (
        "logout_response",
        lambda d: p.logout_response(itt=9, response=0, digests=d, **SN),
        p.LOGOUT_RESPONSE,
    ),
    (
        "r2t",
        lambda d: p.r2t(itt=10, ttt=11, r2tsn=0, offset=0, length=4096, digests=d, **SN),
        p.R2T,
    ),
    ("async_message", lambda d: p.async_message(event=1, digests=d, **SN), p.ASYNC_MESSAGE),
    ("reject", lambda d: p.reject(reason=4, header=bytes(48), digests=d, **SN), p.REJECT),
]

INITIATOR_PDUS: list[tuple[str, Callable[[p.Digests], bytes], int]] = [
    (
        "nop_out",
        lambda d: p.nop_out(itt=1, cmdsn=2, exp_statsn=3, data=b"hello", digests=d),
        p.NOP_OUT,
    ),
    (
        "scsi_command",
        lambda d: p.scsi_command(
            itt=2,
            lun=p.lun_field(3),
            cdb=b"\x2a" + bytes(9),
            cmdsn=1,
            exp_statsn=1,
            expected_length=512,
            write=True,
            data=b"x" * 512,
            digests=d,
        ),
        p.SCSI_COMMAND,
    ),
    (
        "task_mgmt",
        lambda d: p.task_mgmt(function=1, itt=3, cmdsn=1, exp_statsn=1, digests=d),
        p.TASK_MGMT,
    ),
    (
        "login_request",
        lambda _d: p.login_request(
            isid=bytes(6),
            tsih=0,
            itt=0,
            cid=0,
            cmdsn=1,
            exp_statsn=0,
            csg=1,
            nsg=3,
            transit=True,
            data=b"InitiatorName=iqn.x\0",
        ),
        p.LOGIN,
    ),
    (
        "text_request",
        lambda d: p.text_request(
            itt=5, cmdsn=1, exp_statsn=1, data=b"SendTargets=All\0", digests=d
        ),
        p.TEXT,
    ),
    (
        "data_out",
        lambda d: p.data_out(
            itt=6, ttt=7, exp_statsn=1, datasn=0, offset=0, data=b"y" * 3, final=True, digests=d
        ),
        p.DATA_OUT,
    ),
    (
        "logout_request",
        lambda d: p.logout_request(itt=7, cmdsn=1, exp_statsn=1, digests=d),
        p.LOGOUT,
    ),
]

ALL = [(n, b, op, p.TARGET_OPCODES) for n, b, op in TARGET_PDUS] + [
    (n, b, op, p.INITIATOR_OPCODES) for n, b, op in INITIATOR_PDUS
]
IDS = [case[0] for case in ALL]


def decoder(expect: frozenset[int], digests: p.Digests = p.NO_DIGESTS) -> p.PduDecoder:
    d = p.PduDecoder(max_data=8192, expect=expect)
    d.header_digest, d.data_digest = digests.header, digests.data
    return d


def digests_for(opcode: int) -> p.Digests:
    # Login PDUs never carry digests: they are what negotiates them.
    return p.NO_DIGESTS if opcode in (p.LOGIN, p.LOGIN_RESPONSE) else D


@pytest.mark.parametrize(("name", "build", "opcode", "expect"), ALL, ids=IDS)
def test_every_pdu_whole(
    name: str, build: Callable[[p.Digests], bytes], opcode: int, expect: frozenset[int]
) -> None:
    for digests in (p.NO_DIGESTS, digests_for(opcode)):
        wire = build(digests)
        dec = decoder(expect, digests)
        dec.receive_data(wire)
        pdu = dec.next_pdu()
        assert pdu is not None
        assert pdu.opcode == opcode
        assert len(pdu.bhs) == p.BHS_SIZE
        assert len(wire) % 4 == 0
        assert dec.next_pdu() is None
        assert dec.buffered == 0


@pytest.mark.parametrize(("name", "build", "opcode", "expect"), ALL, ids=IDS)
def test_every_pdu_byte_by_byte_with_trailing_bytes(
    name: str, build: Callable[[p.Digests], bytes], opcode: int, expect: frozenset[int]
) -> None:
    digests = digests_for(opcode)
    wire = build(digests)
    follow = (
        p.nop_in(itt=99, ttt=p.RESERVED_TAG, digests=digests, **SN)
        if opcode in p.TARGET_OPCODES
        else p.nop_out(itt=99, cmdsn=1, exp_statsn=1, digests=digests)
    )
    dec = decoder(expect, digests)
    got: list[p.Pdu] = []
    for i, byte in enumerate(wire + follow[:30]):
        dec.receive_data(bytes([byte]))
        pdu = dec.next_pdu()
        if pdu is not None:
            got.append(pdu)
            assert i == len(wire) - 1  # exactly when its last byte arrived
    assert [x.opcode for x in got] == [opcode]
    assert dec.buffered == 30  # the start of the next PDU waits
    dec.receive_data(follow[30:])
    nxt = dec.next_pdu()
    assert nxt is not None
    assert nxt.itt == 99


def test_fields_round_trip() -> None:
    wire = p.scsi_command(
        itt=0x1234,
        lun=p.lun_field(5),
        cdb=b"\x28" + bytes(8) + b"\x01",
        cmdsn=77,
        exp_statsn=66,
        expected_length=512,
        read=True,
        immediate=True,
    )
    dec = decoder(p.INITIATOR_OPCODES)
    dec.receive_data(wire)
    pdu = dec.next_pdu()
    assert pdu is not None
    assert pdu.immediate
    assert pdu.itt == 0x1234
    assert p.lun_number(pdu.lun_field) == 5
    assert pdu.u32(20) == 512
    assert pdu.cmdsn == 77
    assert pdu.exp_statsn == 66
    assert pdu.bhs[32] == 0x28
    assert pdu.flags & p.F_READ
    assert pdu.final


def test_data_is_padded_and_digest_is_crc32c_little_endian() -> None:
    wire = p.nop_in(itt=1, ttt=2, data=b"abcde", digests=D, **SN)
    header, rest = wire[:48], wire[48:]
    assert rest[:4] == crc32c(header).to_bytes(4, "little")
    body = rest[4:12]
    assert body == b"abcde\0\0\0"
    assert rest[12:16] == crc32c(body).to_bytes(4, "little")
    assert len(wire) == 48 + 4 + 8 + 4


def test_crc32c_reference_value() -> None:
    # RFC 3720 B.4: 32 bytes of zeroes.
    assert crc32c(bytes(32)) == 0x8A9136AA


@pytest.mark.parametrize("lun", [0, 1, 255, 256, 16383])
def test_lun_field_round_trip(lun: int) -> None:
    assert p.lun_number(p.lun_field(lun)) == lun


def test_lun_field_other_forms_are_none() -> None:
    assert p.lun_number(bytes([0x80, 1]) + bytes(6)) is None  # logical unit addressing
    assert p.lun_number(bytes([0, 1, 0, 1]) + bytes(4)) is None  # second level


def test_header_digest_error_closes_without_reject() -> None:
    wire = bytearray(p.nop_out(itt=1, cmdsn=1, exp_statsn=1, digests=D))
    wire[20] ^= 1
    dec = decoder(p.INITIATOR_OPCODES, D)
    dec.receive_data(wire)
    with pytest.raises(p.PduError) as info:
        dec.next_pdu()
    assert info.value.reject_reason is None
    assert isinstance(info.value, ProtocolError)


def test_data_digest_error_is_rejected_with_its_reason() -> None:
    wire = bytearray(p.nop_out(itt=1, cmdsn=1, exp_statsn=1, data=b"payload!", digests=D))
    wire[48 + 4 + 1] ^= 0xFF
    dec = decoder(p.INITIATOR_OPCODES, D)
    dec.receive_data(wire)
    with pytest.raises(p.PduError) as info:
        dec.next_pdu()
    assert info.value.reject_reason == p.REJECT_DATA_DIGEST
    assert info.value.header == bytes(wire[:48])


def test_oversize_data_segment_is_refused_from_the_header_alone() -> None:
    """Only the header has arrived: the decoder refuses before buffering the data."""
    dec = decoder(p.INITIATOR_OPCODES)
    header = p.nop_out(itt=1, cmdsn=1, exp_statsn=1, data=b"z" * 8193)[:48]
    dec.receive_data(header)
    with pytest.raises(p.PduError) as info:
        dec.next_pdu()
    assert info.value.reject_reason == p.REJECT_PROTOCOL_ERROR
    assert "MaxRecvDataSegmentLength" in info.value.message


def test_login_limit_is_8192_until_raised() -> None:
    dec = p.PduDecoder()
    assert dec.max_data == p.LOGIN_MAX_DATA == 8192
    dec.receive_data(p.text_request(itt=1, cmdsn=1, exp_statsn=1, data=b"k" * 8192))
    assert dec.next_pdu() is not None


def test_unknown_or_wrong_direction_opcode_is_a_protocol_error() -> None:
    dec = decoder(p.INITIATOR_OPCODES)
    dec.receive_data(p.nop_in(itt=1, ttt=2, **SN))  # a target PDU sent to the target
    with pytest.raises(p.PduError) as info:
        dec.next_pdu()
    assert info.value.reject_reason == p.REJECT_PROTOCOL_ERROR


def test_ahs_is_framed() -> None:
    wire = p.build(p.SCSI_COMMAND, 0x81, ahs=b"\x00\x05\x01\x00" + bytes(4), data=b"dd")
    dec = decoder(p.INITIATOR_OPCODES)
    dec.receive_data(wire)
    pdu = dec.next_pdu()
    assert pdu is not None
    assert pdu.ahs == b"\x00\x05\x01\x00" + bytes(4)
    assert pdu.data == b"dd"


def test_buffer_is_bounded_while_drained() -> None:
    """Many maximal PDUs fed in odd-sized chunks: the buffer never grows past
    one PDU plus one receive."""
    dec = p.PduDecoder(max_data=256 << 10)
    one = p.nop_out(itt=1, cmdsn=1, exp_statsn=1, data=b"q" * (256 << 10))
    stream = one * 8
    seen = 0
    for start in range(0, len(stream), 100_003):
        dec.receive_data(stream[start : start + 100_003])
        while dec.next_pdu() is not None:
            seen += 1
        assert dec.capacity <= dec.max_pdu_size() + (128 << 10)
    assert seen == 8


def test_login_status_class_and_detail_land_in_bytes_36_and_37() -> None:
    wire = p.login_response(
        flags=0, isid=bytes(6), tsih=0, itt=1, status_class=0x02, status_detail=0x01, **SN
    )
    assert wire[36:38] == b"\x02\x01"
