"""Block commands on a real array: data round trips, the gate, and exact sense bytes."""

from __future__ import annotations

import pytest

from lunseal.engine.backends.layers import PowerLossBackend
from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.interface import GOOD, LunAccess
from lunseal.frontends.scsi.sense import DATA_PROTECT, ILLEGAL_REQUEST, MISCOMPARE
from tests.frontends.scsi import cdbs
from tests.frontends.scsi.conftest import MiB, Scsi, nexus
from tests.frontends.scsi.sensecheck import assert_sense

BLOCKS = 16 * MiB // 512


def pattern(blocks: int, seed: int = 1) -> bytes:
    return bytes((seed + i) % 251 for i in range(blocks * 512))


def changes(lun: Lun) -> list[tuple[int, int]]:
    """Records every change the LUN's gate accepts."""
    seen: list[tuple[int, int]] = []
    lun.listeners.append(lambda _lun, off, length: seen.append((off, length)))
    return seen


@pytest.mark.parametrize(
    ("write", "read"),
    [
        (lambda lba, n: cdbs.rw6(0x0A, lba, n), lambda lba, n: cdbs.rw6(0x08, lba, n)),
        (lambda lba, n: cdbs.rw10(0x2A, lba, n), lambda lba, n: cdbs.rw10(0x28, lba, n)),
        (lambda lba, n: cdbs.rw12(0xAA, lba, n), lambda lba, n: cdbs.rw12(0xA8, lba, n)),
        (lambda lba, n: cdbs.rw16(0x8A, lba, n), lambda lba, n: cdbs.rw16(0x88, lba, n)),
    ],
    ids=["6", "10", "12", "16"],
)
def test_write_then_read_round_trips(scsi: Scsi, write, read) -> None:  # type: ignore[no-untyped-def]
    data = pattern(3)
    seen = changes(scsi.disk)
    scsi.good(write(100, 3), data)
    assert seen == [(100 * 512, 3 * 512)]
    assert scsi.good(read(100, 3)) == data
    assert scsi.disk.read(100 * 512, 3 * 512) == data


def test_read6_zero_blocks_means_256(scsi: Scsi) -> None:
    assert len(scsi.good(cdbs.rw6(0x08, 0, 0))) == 256 * 512


def test_zero_length_read_and_write_do_nothing(scsi: Scsi) -> None:
    seen = changes(scsi.disk)
    assert scsi.good(cdbs.rw10(0x28, 0, 0)) == b""
    scsi.good(cdbs.rw10(0x2A, 0, 0))
    assert seen == []


def test_fua_write_is_flushed_and_plain_write_is_not(scsi: Scsi) -> None:
    layer = scsi.disk.push_layer(PowerLossBackend)
    scsi.good(cdbs.rw10(0x2A, 0, 1), pattern(1))
    assert layer.unflushed == 1
    scsi.good(cdbs.rw16(0x8A, 8, 1, flags=0x08), pattern(1))
    assert layer.unflushed == 0


def test_synchronize_cache_flushes(scsi: Scsi) -> None:
    layer = scsi.disk.push_layer(PowerLossBackend)
    scsi.good(cdbs.rw10(0x2A, 0, 1), pattern(1))
    scsi.good(cdbs.rw10(0x35, 0, 0))
    assert layer.unflushed == 0
    scsi.good(cdbs.rw10(0x2A, 0, 1), pattern(1))
    scsi.good(cdbs.rw16(0x91, 0, 0))
    assert layer.unflushed == 0


@pytest.mark.parametrize("op", [0x28, 0x2A, 0x2F, 0x35, 0x34])
def test_beyond_the_end_is_lba_out_of_range(scsi: Scsi, op: int) -> None:
    seen = changes(scsi.disk)
    result = scsi.run(cdbs.rw10(op, BLOCKS - 1, 2), pattern(2))
    assert_sense(result, ILLEGAL_REQUEST, 0x21, 0x00)
    assert seen == []


def test_lba_past_64_bits_of_blocks_is_out_of_range(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.rw16(0x88, (1 << 64) - 1, 1)), ILLEGAL_REQUEST, 0x21, 0x00)


@pytest.mark.parametrize("op", [0x28, 0x2A, 0xA8, 0x88, 0x8A, 0x2F, 0x2E])
def test_protection_field_is_an_invalid_field_at_byte1_bit7(scsi: Scsi, op: int) -> None:
    size = {0x28: 10, 0x2A: 10, 0x2F: 10, 0x2E: 10, 0xA8: 12, 0x88: 16, 0x8A: 16}[op]
    make = {10: cdbs.rw10, 12: cdbs.rw12, 16: cdbs.rw16}[size]
    result = scsi.run(make(op, 0, 1, flags=0x20), pattern(1))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 7))


def test_transfer_longer_than_block_limits_is_refused(scsi: Scsi) -> None:
    scsi.array.create_lun("big", 64 * MiB, number=1)
    scsi.attach(lun=1)
    result = scsi.run(cdbs.rw12(0xA8, 0, 65537), lun=1)
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(6, None))
    assert scsi.run(cdbs.rw12(0xA8, 0, 65536), lun=1).status == GOOD


def test_short_data_out_is_an_invalid_field_in_the_information_unit(scsi: Scsi) -> None:
    """Less data than the initiator said it would send: nothing is written."""
    seen = changes(scsi.disk)
    result = scsi.run(cdbs.rw10(0x2A, 0, 2), pattern(1), expected=1024)
    assert_sense(result, ILLEGAL_REQUEST, 0x0E, 0x03)
    result = scsi.run(cdbs.unmap(24), cdbs.unmap_list((0, 8))[:16], expected=24)
    assert_sense(result, ILLEGAL_REQUEST, 0x0E, 0x03)
    assert seen == []


@pytest.mark.parametrize("op", [0x2A, 0x2E])
def test_write_shorter_transfer_writes_only_what_was_sent(scsi: Scsi, op: int) -> None:
    """EDTL below the CDB's length: the blocks sent are written, no more."""
    seen = changes(scsi.disk)
    scsi.good(cdbs.rw10(op, 0, 2), pattern(1), expected=512)
    assert seen == [(0, 512)]
    assert scsi.disk.read(0, 1024) == pattern(1) + bytes(512)
    scsi.good(cdbs.rw10(op, 0, 1), expected=0)
    assert seen == [(0, 512)]


def _protect_by_flag(scsi: Scsi) -> None:
    scsi.array.set_read_only("disk", True)


def _protect_by_guard(scsi: Scsi) -> None:
    scsi.disk.write_guards["mirror"] = "target of synchronised mirror m1"


def _protect_for_initiator(scsi: Scsi) -> None:
    scsi.nexus = nexus(access=LunAccess(read_only=frozenset({0})))


@pytest.mark.parametrize("protect", [_protect_by_flag, _protect_by_guard, _protect_for_initiator])
@pytest.mark.parametrize(
    ("cdb", "data"),
    [
        (cdbs.rw10(0x2A, 0, 1), pattern(1)),
        (cdbs.rw6(0x0A, 0, 1), pattern(1)),
        (cdbs.rw16(0x8E, 0, 1), pattern(1)),
        (bytes((0x41, 0x08, 0, 0, 0, 0, 0, 0, 8, 0)), bytes(512)),
        (cdbs.unmap(24), cdbs.unmap_list((0, 8))),
        (cdbs.caw(0, 1), bytes(512) + pattern(1)),
    ],
    ids=["write10", "write6", "write-verify16", "write-same", "unmap", "caw"],
)
def test_write_protected_refuses_every_writing_command(  # type: ignore[no-untyped-def]
    scsi: Scsi, protect, cdb: bytes, data: bytes
) -> None:
    protect(scsi)
    seen = changes(scsi.disk)
    assert_sense(scsi.run(cdb, data), DATA_PROTECT, 0x27, 0x00)
    assert seen == []
    assert scsi.disk.read(0, 4096) == bytes(4096)


def test_write_and_verify_writes_durably(scsi: Scsi) -> None:
    layer = scsi.disk.push_layer(PowerLossBackend)
    for cdb in (cdbs.rw10(0x2E, 5, 2), cdbs.rw12(0xAE, 5, 2), cdbs.rw16(0x8E, 5, 2)):
        scsi.good(cdb, pattern(2))
        assert layer.unflushed == 0
    assert scsi.disk.read(5 * 512, 1024) == pattern(2)


def test_verify_bytchk0_checks_range_only(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2F, 0, 8))
    scsi.good(cdbs.rw16(0x8F, 0, 8))


def test_verify_bytchk1_compares_and_reports_the_first_differing_byte(scsi: Scsi) -> None:
    data = pattern(4)
    scsi.good(cdbs.rw10(0x2A, 10, 4), data)
    scsi.good(cdbs.rw10(0x2F, 10, 4, flags=0x02), data)
    scsi.good(cdbs.rw12(0xAF, 10, 4, flags=0x02), data)
    bad = bytearray(data)
    bad[1000] ^= 0xFF
    result = scsi.run(cdbs.rw16(0x8F, 10, 4, flags=0x02), bytes(bad))
    assert_sense(result, MISCOMPARE, 0x1D, 0x00, information=1000)


def test_verify_bytchk3_compares_one_block_against_each(scsi: Scsi) -> None:
    block = pattern(1)
    scsi.good(cdbs.rw10(0x2A, 0, 3), block * 3)
    scsi.good(cdbs.rw10(0x2F, 0, 3, flags=0x06), block)
    scsi.good(cdbs.rw10(0x2A, 2, 1), bytes(512))
    result = scsi.run(cdbs.rw10(0x2F, 0, 3, flags=0x06), block)
    first = next(i for i in range(512) if block[i]) + 1024
    assert_sense(result, MISCOMPARE, 0x1D, 0x00, information=first)


def test_verify_bytchk2_is_reserved(scsi: Scsi) -> None:
    result = scsi.run(cdbs.rw10(0x2F, 0, 1, flags=0x04), pattern(1))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 2))


def test_compare_and_write_writes_when_equal(scsi: Scsi) -> None:
    old, new = pattern(2, 3), pattern(2, 9)
    scsi.good(cdbs.rw10(0x2A, 40, 2), old)
    seen = changes(scsi.disk)
    scsi.good(cdbs.caw(40, 2), old + new)
    assert seen == [(40 * 512, 1024)]
    assert scsi.disk.read(40 * 512, 1024) == new


def test_compare_and_write_miscompare_reports_offset_and_writes_nothing(scsi: Scsi) -> None:
    old = pattern(2, 3)
    scsi.good(cdbs.rw10(0x2A, 40, 2), old)
    wrong = bytearray(old)
    wrong[700] ^= 1
    seen = changes(scsi.disk)
    result = scsi.run(cdbs.caw(40, 2), bytes(wrong) + bytes(1024))
    assert_sense(result, MISCOMPARE, 0x1D, 0x00, information=700)
    assert seen == []
    assert scsi.disk.read(40 * 512, 1024) == old


def test_compare_and_write_needs_both_halves(scsi: Scsi) -> None:
    result = scsi.run(cdbs.caw(0, 2), bytes(1024))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(13, None))


def test_compare_and_write_count_must_match_the_transfer(scsi: Scsi) -> None:
    """256 blocks wrap to 0 in the one-byte count: the initiator still sends data."""
    seen = changes(scsi.disk)
    result = scsi.run(cdbs.caw(0, 0), expected=2 * 256 * 512)
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(13, None))
    assert scsi.run(cdbs.caw(0, 0), expected=0).status == GOOD
    assert seen == []


def test_compare_and_write_fua_flushes(scsi: Scsi) -> None:
    layer = scsi.disk.push_layer(PowerLossBackend)
    scsi.good(cdbs.caw(0, 1, flags=0x08), bytes(512) + pattern(1))
    assert layer.unflushed == 0


def ws(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    return cdbs.rw10(op, lba, blocks, flags) if op == 0x41 else cdbs.rw16(op, lba, blocks, flags)


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_repeats_the_block(scsi: Scsi, op: int) -> None:
    block = pattern(1, 7)
    seen = changes(scsi.disk)
    scsi.good(ws(op, 100, 2100), block)
    assert scsi.disk.read(100 * 512, 2100 * 512) == block * 2100
    assert sum(length for _, length in seen) == 2100 * 512


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_unmap_deallocates_and_reads_zero(scsi: Scsi, op: int) -> None:
    scsi.good(cdbs.rw10(0x2A, 64, 16), pattern(16))
    seen = changes(scsi.disk)
    scsi.good(ws(op, 64, 16, flags=0x08), bytes(512))
    assert seen == [(64 * 512, 16 * 512)]
    assert scsi.disk.read(64 * 512, 16 * 512) == bytes(16 * 512)
    status = scsi.good(cdbs.lba_status(64))
    # The unmapped range joins the never-written rest of the LUN: one run to the end.
    assert status[8:20] == (64).to_bytes(8, "big") + (BLOCKS - 64).to_bytes(4, "big")
    assert status[20] == 1


def test_write_same_unmap_deallocates_whatever_the_data(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2A, BLOCKS - 3, 3), pattern(3))
    scsi.good(ws(0x41, BLOCKS - 3, 0, flags=0x08), bytes([0xFF]) * 512)
    assert scsi.disk.read((BLOCKS - 3) * 512, 1536) == bytes(1536)


def test_write_same16_ndob_zeroes_without_data(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2A, 0, 8), pattern(8))
    scsi.good(ws(0x93, 0, 8, flags=0x09), expected=0)
    assert scsi.disk.read(0, 4096) == bytes(4096)


@pytest.mark.parametrize("op", [0x41, 0x93])
def test_write_same_zero_blocks_runs_to_the_last_block(scsi: Scsi, op: int) -> None:
    block = pattern(1, 5)
    seen = changes(scsi.disk)
    scsi.good(ws(op, BLOCKS - 10, 0), block)
    assert seen == [((BLOCKS - 10) * 512, 10 * 512)]
    assert scsi.disk.read((BLOCKS - 10) * 512, 10 * 512) == block * 10


@pytest.mark.parametrize(("op", "byte"), [(0x41, 7), (0x93, 10)])
def test_write_same_longer_than_the_limit_is_refused(scsi: Scsi, op: int, byte: int) -> None:
    scsi.array.create_lun("huge", 2 << 30, number=1)
    scsi.attach(lun=1)
    seen = changes(scsi.array.lun("huge"))
    if op == 0x93:  # WRITE SAME(10) cannot even name that many blocks
        result = scsi.run(ws(op, 0, (1 << 21) + 1), bytes(512), lun=1)
        assert_sense(result, ILLEGAL_REQUEST, 0x24, 0, pointer=(byte, None))
    result = scsi.run(ws(op, 0, 0), bytes(512), lun=1)  # to the end: 4 Mi blocks
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0, pointer=(byte, None))
    assert seen == []


@pytest.mark.parametrize("sent", [256, 1024])
def test_write_same_takes_exactly_one_block(scsi: Scsi, sent: int) -> None:
    seen = changes(scsi.disk)
    result = scsi.run(ws(0x41, 0, 8, flags=0x08), bytes(min(sent, 512)), expected=sent)
    assert_sense(result, ILLEGAL_REQUEST, 0x0E, 0x03)
    result = scsi.run(ws(0x93, 0, 8, flags=0x09), expected=512)  # NDOB: no data at all
    assert_sense(result, ILLEGAL_REQUEST, 0x0E, 0x03)
    assert seen == []


def test_write_same_anchor_is_refused(scsi: Scsi) -> None:
    result = scsi.run(ws(0x41, 0, 1, flags=0x18), bytes(512))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 4))


def test_unmap_deallocates_ranges(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2A, 0, 64), pattern(64))
    params = cdbs.unmap_list((8, 8), (32, 16))
    seen = changes(scsi.disk)
    scsi.good(cdbs.unmap(len(params)), params)
    assert seen == [(8 * 512, 8 * 512), (32 * 512, 16 * 512)]
    assert scsi.disk.read(8 * 512, 4096) == bytes(4096)
    assert scsi.disk.read(0, 4096) == pattern(8)


def test_unmap_with_no_parameter_list_does_nothing(scsi: Scsi) -> None:
    seen = changes(scsi.disk)
    scsi.good(cdbs.unmap(0))
    assert seen == []


def test_unmap_short_header_is_a_length_error(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.unmap(6), bytes(6)), ILLEGAL_REQUEST, 0x1A, 0x00)


def test_unmap_beyond_the_end_changes_nothing(scsi: Scsi) -> None:
    params = cdbs.unmap_list((0, 8), (BLOCKS - 4, 8))
    seen = changes(scsi.disk)
    assert_sense(scsi.run(cdbs.unmap(len(params)), params), ILLEGAL_REQUEST, 0x21, 0x00)
    assert seen == []


def test_unmap_too_many_descriptors_points_into_the_parameter_list(scsi: Scsi) -> None:
    params = cdbs.unmap_list(*[(i * 8, 8) for i in range(257)])
    result = scsi.run(cdbs.unmap(len(params)), params)
    assert_sense(result, ILLEGAL_REQUEST, 0x26, 0x00, pointer=(2, None), in_cdb=False)


def test_get_lba_status_reports_mapped_and_deallocated_runs(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2A, 16, 8), pattern(8))
    data = scsi.good(cdbs.lba_status(0))
    descriptors = [data[i : i + 16] for i in range(8, len(data), 16)]
    runs = [
        (int.from_bytes(d[0:8], "big"), int.from_bytes(d[8:12], "big"), d[12]) for d in descriptors
    ]
    assert runs == [(0, 16, 1), (16, 8, 0), (24, BLOCKS - 24, 1)]
    assert int.from_bytes(data[0:4], "big") == len(data) - 4


def test_get_lba_status_starts_at_the_physical_block_of_the_requested_lba(scsi: Scsi) -> None:
    """On a boundary the report starts at the LBA asked for (qemu needs that);
    inside a 4 KiB physical block, at the next one (libiscsi expects that)."""
    assert int.from_bytes(scsi.good(cdbs.lba_status(16))[8:16], "big") == 16
    assert int.from_bytes(scsi.good(cdbs.lba_status(5))[8:16], "big") == 8
    last = BLOCKS - 3
    assert int.from_bytes(scsi.good(cdbs.lba_status(last))[8:16], "big") == last


def test_orwrite_ors_the_data_into_the_blocks(scsi: Scsi) -> None:
    scsi.good(cdbs.rw10(0x2A, 4, 2), bytes([0x0F]) * 1024)
    seen = changes(scsi.disk)
    scsi.good(cdbs.rw16(0x8B, 4, 2), bytes([0x30]) * 1024)
    assert seen == [(4 * 512, 1024)]
    assert scsi.disk.read(4 * 512, 1024) == bytes([0x3F]) * 1024
    protect = scsi.run(cdbs.rw16(0x8B, 4, 1, flags=0x20), bytes(512))
    assert_sense(protect, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 7))
    _protect_by_guard(scsi)
    assert_sense(scsi.run(cdbs.rw16(0x8B, 4, 1), bytes(512)), DATA_PROTECT, 0x27, 0x00)


def test_get_lba_status_looks_one_window_ahead(scsi: Scsi) -> None:
    scsi.array.create_lun("huge", 3 << 30, number=1)
    scsi.attach(lun=1)
    data = scsi.good(cdbs.lba_status(8), lun=1)
    assert int.from_bytes(data[0:4], "big") == 4 + 16
    assert data[8:21] == (8).to_bytes(8, "big") + ((1 << 30) // 512).to_bytes(4, "big") + b"\x01"


def test_get_lba_status_beyond_the_end(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.lba_status(BLOCKS)), ILLEGAL_REQUEST, 0x21, 0x00)


def test_read_capacity(scsi: Scsi) -> None:
    data = scsi.good(bytes((0x25,)) + bytes(9))
    assert data == (BLOCKS - 1).to_bytes(4, "big") + (512).to_bytes(4, "big")
    data = scsi.good(cdbs.read_capacity16())
    assert int.from_bytes(data[0:8], "big") == BLOCKS - 1
    assert int.from_bytes(data[8:12], "big") == 512
    assert data[13] & 0x0F == 3  # 4 KiB physical blocks
    assert data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    assert len(scsi.good(cdbs.read_capacity16(alloc=12))) == 12


def test_read_capacity10_lba_without_pmi_is_invalid(scsi: Scsi) -> None:
    cdb = bytes((0x25, 0, 0, 0, 0, 1, 0, 0, 0, 0))
    assert_sense(scsi.run(cdb), ILLEGAL_REQUEST, 0x24, 0x00, pointer=(2, None))


def test_prefetch_and_status_are_good(scsi: Scsi) -> None:
    assert scsi.run(cdbs.rw10(0x34, 0, 8)).status == GOOD
    assert scsi.run(cdbs.rw16(0x90, 0, 8)).status == GOOD


def test_a_synced_mirror_target_is_write_protected(scsi: Scsi) -> None:
    """A real mirror: while synchronised its target refuses every write and
    reports WP; the source still takes writes (and passes them on)."""
    target = scsi.array.create_lun("copy", scsi.disk.size, number=1)
    mirror = scsi.array.mirrors.create(scsi.disk, target)
    for _ in range(10_000):
        if not scsi.array.mirrors.busy():
            break
        scsi.array.mirrors.copy_step(4 * MiB)
    assert mirror.state == "synced"
    scsi.attach(lun=1)
    seen = changes(target)
    assert_sense(scsi.run(cdbs.rw10(0x2A, 0, 1), pattern(1), lun=1), DATA_PROTECT, 0x27, 0)
    assert_sense(scsi.run(cdbs.unmap(24), cdbs.unmap_list((0, 8)), lun=1), DATA_PROTECT, 0x27, 0)
    assert scsi.good(cdbs.mode_sense6(0x08), lun=1)[2] & 0x80
    assert seen == []
    scsi.good(cdbs.rw10(0x2A, 0, 1), pattern(1))
    assert target.read(0, 512) == pattern(1)
