"""INQUIRY: standard data and the vital product data pages (SPC-4 6.6, 7.8; SBC-3 6.6)."""

from __future__ import annotations

import uuid

from lunseal import __version__
from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.cdb import (
    MAX_COMPARE_WRITE_BLOCKS,
    MAX_TRANSFER_BLOCKS,
    MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS,
    PHYS_EXPONENT,
    be,
)
from lunseal.frontends.scsi.interface import Nexus, ScsiResult
from lunseal.frontends.scsi.sense import invalid_field

VENDOR = b"LUNSEAL "
PRODUCT = b"lunseal LUN     "
#: Peripheral qualifier 0, direct-access block device; 3/1Fh: no LUN here.
DISK = 0x00
NO_LUN = 0x7F
#: Version descriptors (SPC-4 table 144): SAM-5, SPC-4, SBC-3, iSCSI.
VERSIONS = (0x00A0, 0x0460, 0x04C0, 0x0960)
#: iSCSI protocol identifier in designation descriptors.
ISCSI = 0x5
PAGES = (0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2)
RELATIVE_PORT = 1


def inquiry(cdb: bytes, lun: Lun | None, nexus: Nexus) -> ScsiResult:
    evpd, page, alloc = cdb[1] & 0x01, cdb[2], be(cdb, 3, 5)
    if cdb[1] & 0x02:
        raise invalid_field(1, 1, "CMDDT is obsolete")
    if not evpd:
        if page:
            raise invalid_field(2, None, "a page code needs EVPD")
        return ScsiResult(data=standard(lun)[:alloc])
    if lun is None:
        raise invalid_field(1, 0, "no vital product data for an absent LUN")
    makers = {
        0x00: supported_pages,
        0x80: unit_serial,
        0x83: lambda lun: identification(lun, nexus),
        0xB0: block_limits,
        0xB1: characteristics,
        0xB2: provisioning,
    }
    if page not in makers:
        raise invalid_field(2, None, f"VPD page {page:#04x} is not supported")
    return ScsiResult(data=makers[page](lun)[:alloc])


def standard(lun: Lun | None) -> bytes:
    data = bytearray(74)
    data[0] = DISK if lun is not None else NO_LUN
    data[2] = 0x06  # SPC-4
    data[3] = 0x12  # HISUP, response data format 2
    data[4] = len(data) - 5
    data[7] = 0x02  # CMDQUE
    data[8:16] = VENDOR
    data[16:32] = PRODUCT
    data[32:36] = __version__.replace(".", "").encode()[:4].ljust(4)
    for i, version in enumerate(VERSIONS):
        data[58 + 2 * i : 60 + 2 * i] = version.to_bytes(2, "big")
    return bytes(data)


def _page(code: int, body: bytes) -> bytes:
    return bytes((DISK, code)) + len(body).to_bytes(2, "big") + body


def supported_pages(lun: Lun) -> bytes:
    return _page(0x00, bytes(PAGES))


def unit_serial(lun: Lun) -> bytes:
    return _page(0x80, lun.record.uuid.encode())


def naa(lun: Lun) -> bytes:
    """NAA 3 (locally assigned): 60 bits of the LUN's random UUID."""
    value = uuid.UUID(lun.record.uuid).int & ((1 << 60) - 1)
    return ((0x3 << 60) | value).to_bytes(8, "big")


def _designator(code_set: int, assoc: int, kind: int, value: bytes, *, piv: bool) -> bytes:
    proto = ISCSI << 4 if piv else 0
    head = bytes((proto | code_set, (0x80 if piv else 0) | assoc << 4 | kind, 0, len(value)))
    return head + value


def _name_string(name: str) -> bytes:
    raw = name.encode() + b"\0"
    return raw + bytes(-len(raw) % 4)


def identification(lun: Lun, nexus: Nexus) -> bytes:
    target_name = nexus.target_port.split(",")[0]
    body = b"".join(
        (
            _designator(0x1, 0, 0x3, naa(lun), piv=False),
            _designator(0x2, 0, 0x1, VENDOR + lun.record.uuid.encode(), piv=False),
            _designator(0x1, 1, 0x4, RELATIVE_PORT.to_bytes(4, "big"), piv=True),
            _designator(0x3, 1, 0x8, _name_string(nexus.target_port), piv=True),
            _designator(0x3, 2, 0x8, _name_string(target_name), piv=True),
        )
    )
    return _page(0x83, body)


def block_limits(lun: Lun) -> bytes:
    body = bytearray(0x3C)
    # WSNZ clear: WRITE SAME with zero blocks runs to the last block.
    body[1] = MAX_COMPARE_WRITE_BLOCKS
    body[2:4] = (1 << PHYS_EXPONENT).to_bytes(2, "big")  # optimal granularity
    body[4:8] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")
    body[8:12] = (1 << 11).to_bytes(4, "big")  # optimal transfer: 1 MiB
    body[12:16] = MAX_TRANSFER_BLOCKS.to_bytes(4, "big")  # prefetch
    body[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
    body[20:24] = MAX_UNMAP_DESCRIPTORS.to_bytes(4, "big")
    body[24:28] = (1 << PHYS_EXPONENT).to_bytes(4, "big")  # unmap granularity
    body[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
    body[32:40] = MAX_WRITE_SAME_BLOCKS.to_bytes(8, "big")
    return _page(0xB0, bytes(body))


def characteristics(lun: Lun) -> bytes:
    body = bytearray(0x3C)
    body[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
    return _page(0xB1, bytes(body))


def provisioning(lun: Lun) -> bytes:
    # LBPU, LBPWS, LBPWS10, LBPRZ (unmapped blocks read zero); thin provisioned.
    return _page(0xB2, bytes((0, 0xE4, 0x02, 0)))
