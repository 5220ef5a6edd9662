"""MODE SENSE(6/10) and MODE SELECT(6/10) (SPC-4 6.11-6.14, SBC-3 6.4).

The pages describe the LUN as it is; none of them can be changed, so MODE
SELECT accepts a parameter list only when it asks for what is already there.
"""

from __future__ import annotations

from collections.abc import Callable

from lunseal.frontends.scsi.cdb import BLOCK, Request, be
from lunseal.frontends.scsi.interface import ScsiResult
from lunseal.frontends.scsi.sense import (
    ILLEGAL_REQUEST,
    SenseError,
    invalid_field,
    invalid_param,
    param_length_error,
)

CURRENT, CHANGEABLE, DEFAULT, SAVED = range(4)
WP = 0x80
DPOFUA = 0x10


def _caching(pc: int) -> bytes:
    page = bytearray(20)
    page[0], page[1] = 0x08, 18
    if pc != CHANGEABLE:
        page[2] = 0x04  # WCE: writes reach the page cache; SYNCHRONIZE CACHE makes them durable
    return bytes(page)


def _control(pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x0A, 10
    if pc != CHANGEABLE:
        page[3] = 0x10  # queue algorithm modifier 1: unrestricted reordering allowed
        page[8:10] = (0xFFFF).to_bytes(2, "big")  # busy timeout: unlimited
    return bytes(page)


def _error_recovery(pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x01, 10
    return bytes(page)


def _exceptions(pc: int) -> bytes:
    page = bytearray(12)
    page[0], page[1] = 0x1C, 10
    return bytes(page)


PAGES: dict[int, Callable[[int], bytes]] = {
    0x01: _error_recovery,
    0x08: _caching,
    0x0A: _control,
    0x1C: _exceptions,
}
ALL_PAGES = 0x3F


def _pages(cdb: bytes) -> bytes:
    pc, code, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
    if pc == SAVED:
        raise SenseError("saved mode pages are not supported", ILLEGAL_REQUEST, 0x39, 0x00)
    if code == ALL_PAGES:
        if subpage not in (0x00, 0xFF):
            raise invalid_field(3, None, "no subpages")
        return b"".join(make(pc) for _, make in sorted(PAGES.items()))
    if code not in PAGES:
        raise invalid_field(2, 5, f"mode page {code:#04x} is not supported")
    if subpage:
        raise invalid_field(3, None, "no subpages")
    return PAGES[code](pc)


def _device_specific(req: Request) -> int:
    return DPOFUA | (WP if req.write_protect() else 0)


def mode_sense6(req: Request) -> ScsiResult:
    dbd = req.cdb[1] & 0x08
    pages = _pages(req.cdb)
    blocks = min(req.blocks_total, 0xFFFFFFFF)
    desc = b"" if dbd else blocks.to_bytes(4, "big") + BLOCK.to_bytes(4, "big")
    head = bytes((3 + len(desc) + len(pages), 0, _device_specific(req), len(desc)))
    data = head + desc + pages
    return ScsiResult(data=data[: req.cdb[4]])


def mode_sense10(req: Request) -> ScsiResult:
    dbd, llbaa = req.cdb[1] & 0x08, req.cdb[1] & 0x10
    pages = _pages(req.cdb)
    if dbd:
        desc = b""
    elif llbaa:
        desc = req.blocks_total.to_bytes(8, "big") + bytes(4) + BLOCK.to_bytes(4, "big")
    else:
        blocks = min(req.blocks_total, 0xFFFFFFFF)
        desc = blocks.to_bytes(4, "big") + BLOCK.to_bytes(4, "big")
    length = 6 + len(desc) + len(pages)
    head = length.to_bytes(2, "big") + bytes(
        (0, _device_specific(req), 0x01 if llbaa and desc else 0, 0)
    )
    data = head + len(desc).to_bytes(2, "big") + desc + pages
    return ScsiResult(data=data[: be(req.cdb, 7, 9)])


def mode_select(req: Request) -> ScsiResult:
    """Accept a parameter list that changes nothing; refuse any change."""
    six = req.cdb[0] == 0x15
    if req.cdb[1] & 0x01:
        raise invalid_field(1, 0, "saved pages are not supported")
    length = req.cdb[4] if six else be(req.cdb, 7, 9)
    data = bytes(req.data_out[:length])
    if len(data) < length:
        raise param_length_error("less data than the parameter list length")
    header = 4 if six else 8
    if length == 0:
        return ScsiResult()
    if length < header:
        raise param_length_error("shorter than the mode parameter header")
    desc_len = data[3] if six else be(data, 6, 8)
    at = header + desc_len
    while at < length:
        at = _check_page(data, at, pc=CURRENT)
    return ScsiResult()


def _check_page(data: bytes, at: int, *, pc: int) -> int:
    code = data[at] & 0x3F
    if code not in PAGES or data[at] & 0x40:
        raise invalid_param(at, None, f"mode page {code:#04x} cannot be selected")
    current = PAGES[code](pc)
    page = data[at : at + len(current)]
    if len(page) < len(current) or page[1] != current[1]:
        raise invalid_param(at + 1, None, "wrong page length")
    for i in range(2, len(current)):
        if (page[i] ^ current[i]) & 0xFF:
            raise invalid_param(at + i, None, "mode parameters cannot be changed")
    return at + len(current)


def mode_select_data_out(cdb: bytes) -> int:
    return cdb[4] if cdb[0] == 0x15 else be(cdb, 7, 9)
