"""SBC-3 block commands: read, write, verify, write same, unmap, LBA status, caching.

Every data change goes through ``Lun.write``/``Lun.zero`` (the gate: the
state changes before the backend is touched).  Handlers run on the LUN's
worker, so a compare followed by a write (COMPARE AND WRITE) is atomic with
respect to every other command on the LUN.
"""

from __future__ import annotations

from lunseal.frontends.scsi.cdb import (
    BLOCK,
    MAX_COMPARE_WRITE_BLOCKS,
    MAX_TRANSFER_BLOCKS,
    MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCRIPTORS,
    MAX_WRITE_SAME_BLOCKS,
    PHYS_EXPONENT,
    BlockRange,
    Request,
    be,
    block_range,
    cdb_length,
)
from lunseal.frontends.scsi.interface import ScsiResult
from lunseal.frontends.scsi.sense import (
    invalid_field,
    invalid_param,
    lba_out_of_range,
    miscompare,
    param_length_error,
    short_data_out,
    write_protected,
)

FUA = 0x08
#: How far one GET LBA STATUS looks: bounds the extent scan of a large, fragmented
#: LUN and keeps every run within the descriptor's 32-bit block count.
STATUS_WINDOW = 1 << 30
#: Bytes written per call when WRITE SAME repeats a non-zero block.
_SAME_CHUNK = 1 << 20


def _transfer(req: Request, *, max_blocks: int = MAX_TRANSFER_BLOCKS) -> BlockRange:
    rng = block_range(req.cdb)
    req.check_range(rng)
    if rng.blocks > max_blocks:
        raise invalid_field(_length_byte(req.cdb), None, f"at most {max_blocks} blocks")
    return rng


def _length_byte(cdb: bytes) -> int:
    return {6: 4, 10: 7, 12: 6, 16: 10}[cdb_length(cdb[0])]


def _require_writable(req: Request) -> None:
    if why := req.write_protect():
        raise write_protected(why)


def _data(req: Request, length: int, *, partial: bool = False) -> memoryview:
    """The first ``length`` bytes of data-out.

    When the initiator's expected transfer length is shorter than what the CDB
    asks for and the transport delivered all of it, a ``partial`` command (a
    plain write) runs on what was sent and nothing beyond it (FCP-4 9.4.2 a,
    what libiscsi's residual tests expect); the transport reports the residual.
    Any other shortfall refuses the command whole, writing nothing."""
    have = len(req.data_out)
    if have >= length:
        return req.data_out[:length]
    if partial and have == req.expected_length:
        return req.data_out[:have]
    raise short_data_out(length, have)


def read(req: Request) -> ScsiResult:
    if cdb_length(req.cdb[0]) != 6:
        req.check_protect_field()
    rng = _transfer(req)
    if rng.blocks == 0:
        return ScsiResult()
    return ScsiResult(data=req.lun.read_slice(rng.offset, rng.length))


def write(req: Request) -> ScsiResult:
    if cdb_length(req.cdb[0]) != 6:
        req.check_protect_field()
    rng = _transfer(req)
    _require_writable(req)
    if rng.blocks == 0:
        return ScsiResult()
    fua = cdb_length(req.cdb[0]) != 6 and bool(req.cdb[1] & FUA)
    data = _data(req, rng.length, partial=True)
    if data:
        req.lun.write(rng.offset, data, fua=fua)
    return ScsiResult()


def write_verify(req: Request) -> ScsiResult:
    """WRITE AND VERIFY: the write is made durable before the status, so the
    verify reads what the medium holds."""
    req.check_protect_field()
    rng = _transfer(req)
    _require_writable(req)
    data = _data(req, rng.length, partial=True) if rng.blocks else b""
    if data:
        req.lun.write(rng.offset, data, fua=True)
    return ScsiResult()


def verify(req: Request) -> ScsiResult:
    req.check_protect_field()
    bytchk = (req.cdb[1] >> 1) & 0x03
    if bytchk == 2:
        raise invalid_field(1, 2, "BYTCHK 2 is reserved")
    rng = _transfer(req)
    if rng.blocks == 0:
        return ScsiResult()
    stored = req.lun.read(rng.offset, rng.length)
    if bytchk == 0:
        return ScsiResult()  # the medium was readable: that is the whole check
    expected = _data(req, BLOCK if bytchk == 3 else rng.length)
    if bytchk == 3:  # one block, compared against every block of the range
        expected = memoryview(bytes(expected) * rng.blocks)
    _compare(stored, expected)
    return ScsiResult()


def _compare(stored: bytes, expected: bytes | memoryview) -> None:
    if stored == expected:
        return
    wanted = bytes(expected)
    first = next(i for i, (a, b) in enumerate(zip(stored, wanted, strict=True)) if a != b)
    raise miscompare(first)


def or_write(req: Request) -> ScsiResult:
    """ORWRITE(16): the blocks become the OR of what they hold and the data-out
    (read and write on the LUN's worker, so no other command comes between)."""
    req.check_protect_field()
    rng = _transfer(req)
    _require_writable(req)
    if rng.blocks == 0:
        return ScsiResult()
    mask = _data(req, rng.length)
    stored = int.from_bytes(req.lun.read(rng.offset, rng.length), "big")
    merged = (stored | int.from_bytes(mask, "big")).to_bytes(rng.length, "big")
    req.lun.write(rng.offset, merged, fua=bool(req.cdb[1] & FUA))
    return ScsiResult()


def compare_and_write(req: Request) -> ScsiResult:
    req.check_protect_field()
    rng = BlockRange(be(req.cdb, 2, 10), req.cdb[13])
    req.check_range(rng)
    if rng.blocks > MAX_COMPARE_WRITE_BLOCKS:
        raise invalid_field(13, None, f"at most {MAX_COMPARE_WRITE_BLOCKS} blocks")
    if req.expected_length != 2 * rng.length or len(req.data_out) != 2 * rng.length:
        # The block count disagrees with the data the initiator sends (a count of
        # 256 wraps to 0 in this one-byte field): nothing is compared or written.
        raise invalid_field(13, None, "data-out must hold the compare and the write data")
    _require_writable(req)
    if rng.blocks == 0:
        return ScsiResult()
    _compare(req.lun.read(rng.offset, rng.length), req.data_out[: rng.length])
    req.lun.write(rng.offset, req.data_out[rng.length :], fua=bool(req.cdb[1] & FUA))
    return ScsiResult()


def write_same(req: Request) -> ScsiResult:
    sixteen = req.cdb[0] == 0x93
    req.check_protect_field()
    flags = req.cdb[1]
    if flags & 0x10:
        raise invalid_field(1, 4, "ANCHOR is not supported")
    if flags & 0x06:
        raise invalid_field(1, 2 if flags & 0x04 else 1, "PBDATA/LBDATA are not supported")
    ndob = sixteen and bool(flags & 0x01)
    rng = block_range(req.cdb)
    req.check_range(rng)
    if rng.blocks == 0:  # WSNZ is clear: zero blocks means up to the last block
        rng = BlockRange(rng.lba, req.blocks_total - rng.lba)
    if rng.blocks > MAX_WRITE_SAME_BLOCKS:
        raise invalid_field(10 if sixteen else 7, None, f"at most {MAX_WRITE_SAME_BLOCKS}")
    _require_writable(req)
    if req.expected_length != (0 if ndob else BLOCK):
        # One block of data-out, no more and no less: anything else means the
        # initiator and the CDB disagree about what is being written.
        raise short_data_out(0 if ndob else BLOCK, req.expected_length)
    block = bytes(BLOCK) if ndob else bytes(_data(req, BLOCK))
    unmap = bool(flags & 0x08)
    if unmap or block.count(0) == BLOCK:
        # With UNMAP the blocks are deallocated and read back as zeroes (LBPRZ),
        # whatever the data-out holds (SBC-3 5.50; libiscsi expects exactly
        # that).  Zeroes without UNMAP are written as zeroes, unmapped or not.
        req.lun.zero(rng.offset, rng.length, may_trim=unmap)
        return ScsiResult()
    _repeat(req, rng, block)
    return ScsiResult()


def _repeat(req: Request, rng: BlockRange, block: bytes) -> None:
    chunk = block * (_SAME_CHUNK // BLOCK)
    offset, end = rng.offset, rng.offset + rng.length
    while offset < end:
        n = min(len(chunk), end - offset)
        req.lun.write(offset, memoryview(chunk)[:n])
        offset += n


def unmap(req: Request) -> ScsiResult:
    if req.cdb[1] & 0x01:
        raise invalid_field(1, 0, "ANCHOR is not supported")
    length = be(req.cdb, 7, 9)
    if length == 0:
        return ScsiResult()
    if length < 8:
        raise param_length_error("an UNMAP parameter list has an 8-byte header")
    data = bytes(_data(req, length))
    ranges = _unmap_ranges(req, data)
    _require_writable(req)
    for rng in ranges:
        if rng.blocks:
            req.lun.zero(rng.offset, rng.length, may_trim=True)
    return ScsiResult()


def _unmap_ranges(req: Request, data: bytes) -> list[BlockRange]:
    described = be(data, 2, 4)
    if described > len(data) - 8:
        raise param_length_error("block descriptor data length exceeds the list")
    count = described // 16
    if count > MAX_UNMAP_DESCRIPTORS:
        raise invalid_param(2, None, f"at most {MAX_UNMAP_DESCRIPTORS} descriptors")
    ranges = []
    for i in range(count):
        at = 8 + 16 * i
        rng = BlockRange(be(data, at, at + 8), be(data, at + 8, at + 12))
        if rng.lba + rng.blocks > req.blocks_total:
            raise lba_out_of_range(rng.lba, rng.blocks)
        if rng.blocks > MAX_UNMAP_BLOCKS:
            raise invalid_param(at + 8, None, f"at most {MAX_UNMAP_BLOCKS} blocks")
        ranges.append(rng)
    return ranges


def get_lba_status(req: Request) -> ScsiResult:
    lba = be(req.cdb, 2, 10)
    alloc = be(req.cdb, 10, 14)
    if lba >= req.blocks_total:
        raise lba_out_of_range(lba, 1)
    room = max(0, (min(alloc, 1 << 16) - 8) // 16)
    descriptors = _lba_status(req, _status_start(req, lba), max(room, 1))
    body = b"".join(descriptors)
    data = (len(body) + 4).to_bytes(4, "big") + bytes(4) + body
    return ScsiResult(data=data[:alloc])


def _status_start(req: Request, lba: int) -> int:
    """Where the report starts: provisioning status is per physical block (4 KiB,
    the unmap granularity), and libiscsi's conformance test expects a start
    inside one to be reported from the next boundary.  A start on a boundary (as
    qemu asks, from the ends of earlier descriptors) is reported as asked."""
    per = 1 << PHYS_EXPONENT
    aligned = -(-lba // per) * per
    return aligned if aligned < req.blocks_total else lba


def _lba_status(req: Request, lba: int, limit: int) -> list[bytes]:
    """Mapped (0) / deallocated (1) runs from ``lba``, at most ``limit`` of them,
    within :data:`STATUS_WINDOW` (the host asks again from where the report ends)."""
    runs: list[list[int]] = []  # [start block, end block, status]
    offset = lba * BLOCK
    for ext in req.lun.extents(offset, min(req.lun.size - offset, STATUS_WINDOW)):
        start, end = ext.offset // BLOCK, -(-ext.end // BLOCK)
        status = 1 if ext.hole else 0
        if runs and runs[-1][2] == status:
            runs[-1][1] = end
        elif runs:
            runs.append([max(start, runs[-1][1]), end, status])
        else:
            runs.append([lba, end, status])
        if len(runs) > limit:
            break
    return [
        s.to_bytes(8, "big") + (e - s).to_bytes(4, "big") + bytes((st, 0, 0, 0))
        for s, e, st in runs[:limit]
        if e > s
    ]


def synchronize_cache(req: Request) -> ScsiResult:
    req.check_range(block_range(req.cdb))
    req.lun.flush()
    return ScsiResult()


def prefetch(req: Request) -> ScsiResult:
    rng = block_range(req.cdb)
    req.check_range(rng)
    if rng.blocks:
        req.lun.cache(rng.offset, rng.length)
    return ScsiResult()


def data_out_length(cdb: bytes) -> int:
    """Bytes of data-out the block command in ``cdb`` asks for."""
    op = cdb[0]
    if op in (0x0A, 0x2A, 0xAA, 0x8A, 0x2E, 0xAE, 0x8E, 0x8B):
        return block_range(cdb).length
    if op in (0x2F, 0xAF, 0x8F):  # VERIFY: data only with BYTCHK
        bytchk = (cdb[1] >> 1) & 0x03
        return {1: block_range(cdb).length, 3: BLOCK}.get(bytchk, 0)
    if op == 0x41:
        return BLOCK
    if op == 0x93:
        return 0 if cdb[1] & 0x01 else BLOCK
    if op == 0x42:
        return be(cdb, 7, 9)
    if op == 0x89:
        return 2 * cdb[13] * BLOCK
    return 0


def read_capacity10(req: Request) -> ScsiResult:
    if not req.cdb[8] & 0x01 and be(req.cdb, 2, 6):
        raise invalid_field(2, None, "an LBA needs PMI")
    last = min(req.blocks_total - 1, 0xFFFFFFFF)
    return ScsiResult(data=last.to_bytes(4, "big") + BLOCK.to_bytes(4, "big"))


def read_capacity16(req: Request) -> ScsiResult:
    data = bytearray(32)
    data[0:8] = (req.blocks_total - 1).to_bytes(8, "big")
    data[8:12] = BLOCK.to_bytes(4, "big")
    data[13] = PHYS_EXPONENT
    data[14] = 0xC0  # LBPME: thin provisioned; LBPRZ: unmapped blocks read zero
    return ScsiResult(data=bytes(data[: be(req.cdb, 10, 14)]))
