"""CDB builders for the tests (big-endian fields, as SBC-3/SPC-4 lay them out)."""

from __future__ import annotations


def rw10(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"


def rw12(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(4, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def rw16(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((op, flags)) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


def rw6(op: int, lba: int, blocks: int) -> bytes:
    return bytes((op,)) + lba.to_bytes(3, "big") + bytes((blocks, 0))


def caw(lba: int, blocks: int, flags: int = 0) -> bytes:
    return bytes((0x89, flags)) + lba.to_bytes(8, "big") + bytes(3) + bytes((blocks, 0, 0))


def inquiry(page: int | None = None, alloc: int = 255) -> bytes:
    evpd = 0 if page is None else 1
    return bytes((0x12, evpd, page or 0)) + alloc.to_bytes(2, "big") + b"\0"


def unmap(length: int) -> bytes:
    return bytes((0x42, 0, 0, 0, 0, 0, 0)) + length.to_bytes(2, "big") + b"\0"


def unmap_list(*ranges: tuple[int, int]) -> bytes:
    body = b"".join(lba.to_bytes(8, "big") + n.to_bytes(4, "big") + bytes(4) for lba, n in ranges)
    return (len(body) + 6).to_bytes(2, "big") + len(body).to_bytes(2, "big") + bytes(4) + body


def lba_status(lba: int, alloc: int = 4096) -> bytes:
    return bytes((0x9E, 0x12)) + lba.to_bytes(8, "big") + alloc.to_bytes(4, "big") + b"\0\0"


def read_capacity16(alloc: int = 32) -> bytes:
    return bytes((0x9E, 0x10)) + bytes(8) + alloc.to_bytes(4, "big") + b"\0\0"


def report_luns(select: int = 0, alloc: int = 4096) -> bytes:
    return bytes((0xA0, 0, select, 0, 0, 0)) + alloc.to_bytes(4, "big") + b"\0\0"


def rsoc(options: int = 0, op: int = 0, sa: int = 0, rctd: bool = False) -> bytes:
    flags = options | (0x80 if rctd else 0)
    return (
        bytes((0xA3, 0x0C, flags, op))
        + sa.to_bytes(2, "big")
        + (65535).to_bytes(4, "big")
        + b"\0\0"
    )


def mode_sense6(page: int, alloc: int = 255, *, dbd: bool = False, pc: int = 0) -> bytes:
    return bytes((0x1A, 0x08 if dbd else 0, pc << 6 | page, 0, alloc, 0))


def mode_sense10(page: int, alloc: int = 1024, *, llbaa: bool = False) -> bytes:
    return bytes((0x5A, 0x10 if llbaa else 0, page, 0, 0, 0, 0)) + alloc.to_bytes(2, "big") + b"\0"


TUR = bytes(6)


def read10(lba: int, blocks: int) -> bytes:
    return rw10(0x28, lba, blocks)


def write10(lba: int, blocks: int) -> bytes:
    return rw10(0x2A, lba, blocks)
