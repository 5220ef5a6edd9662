"""PERSISTENT RESERVE IN parameter data (SPC-4 6.15) and TransportIDs."""

from __future__ import annotations

from lunseal.engine.pr_store import PrRecord
from lunseal.frontends.scsi.reservations.rules import holder_key, holds
from lunseal.frontends.scsi.reservations.spc import (
    ISCSI_PROTOCOL,
    LU_SCOPE,
    RELATIVE_TARGET_PORT,
)
from lunseal.frontends.scsi.sense import invalid_param


def _header(rec: PrRecord, body: bytes) -> bytes:
    return rec.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def read_keys(rec: PrRecord) -> bytes:
    return _header(rec, b"".join(r.key.to_bytes(8, "big") for r in rec.registrations))


def read_reservation(rec: PrRecord) -> bytes:
    if rec.type is None:
        return _header(rec, b"")
    body = bytearray(16)
    body[0:8] = holder_key(rec).to_bytes(8, "big")
    body[13] = (LU_SCOPE << 4) | rec.type
    return _header(rec, bytes(body))


def report_capabilities(rec: PrRecord) -> bytes:
    data = bytearray(8)
    data[1] = 8  # length
    data[2] = 0x01  # PTPL_C; CRH, SIP_C and ATP_C are 0
    data[3] = 0x80 | (0b001 << 4) | (0x01 if rec.aptpl else 0)  # TMV, ALLOW COMMANDS, PTPL_A
    data[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    data[5] = 0x01  # EX_AC_AR
    return bytes(data)


def transport_id(initiator_port: str) -> bytes:
    """An iSCSI TransportID naming an initiator port (format 01b, SPC-4 7.6.4.6)."""
    name = initiator_port.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\0" * (20 - len(name))
    return bytes((0x40 | ISCSI_PROTOCOL, 0)) + len(name).to_bytes(2, "big") + name


def read_full_status(rec: PrRecord) -> bytes:
    body = bytearray()
    for r in rec.registrations:
        tid = transport_id(r.initiator_port)
        desc = bytearray(24)
        desc[0:8] = r.key.to_bytes(8, "big")
        if holds(rec, r.nexus) and rec.type is not None:
            desc[12] = 0x01  # R_HOLDER
            desc[13] = (LU_SCOPE << 4) | rec.type
        desc[18:20] = RELATIVE_TARGET_PORT.to_bytes(2, "big")
        desc[20:24] = len(tid).to_bytes(4, "big")
        body += desc + tid
    return _header(rec, bytes(body))


def parse_transport_id(tid: bytes) -> str:
    """The initiator port an iSCSI TransportID of format 01b names, spelled as
    the transport spells nexuses (``NAME,i,0xISID``, ISID in lower-case hex)."""
    if len(tid) < 24 or tid[0] & 0x0F != ISCSI_PROTOCOL:
        raise invalid_param(24, why="the TransportID is not an iSCSI one")
    if tid[0] >> 6 != 0b01:
        raise invalid_param(24, 7, why="the TransportID must name an initiator port")
    length = int.from_bytes(tid[2:4], "big")
    if length % 4 or 4 + length > len(tid):
        raise invalid_param(26, why="bad TransportID length")
    text = tid[4 : 4 + length].split(b"\0", 1)[0].decode("utf-8", "replace")
    name, sep, isid = text.rpartition(",i,0x")
    if not sep:  # the separator is case-insensitive
        name, sep, isid = text.rpartition(",I,0X")
    if not name or len(isid) != 12 or any(c not in "0123456789abcdefABCDEF" for c in isid):
        raise invalid_param(28, why="the TransportID names no initiator port")
    return f"{name},i,0x{isid.lower()}"
