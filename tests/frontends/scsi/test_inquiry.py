"""INQUIRY standard data and VPD pages, MODE SENSE/SELECT."""

from __future__ import annotations

import uuid

import pytest

from lunseal.frontends.scsi.interface import LunAccess
from lunseal.frontends.scsi.sense import ILLEGAL_REQUEST
from tests.frontends.scsi import cdbs
from tests.frontends.scsi.conftest import TARGET, Scsi, nexus
from tests.frontends.scsi.sensecheck import assert_sense


def test_standard_inquiry(scsi: Scsi) -> None:
    data = scsi.good(cdbs.inquiry())
    assert data[0] == 0x00  # connected direct-access block device
    assert data[1] & 0x80 == 0  # not removable
    assert data[2] == 0x06
    assert data[3] & 0x0F == 2
    assert data[4] == len(data) - 5
    assert data[8:16] == b"LUNSEAL "
    versions = {int.from_bytes(data[i : i + 2], "big") for i in range(58, 74, 2)}
    assert {0x0460, 0x04C0, 0x0960} <= versions


def test_inquiry_is_cut_to_the_allocation_length(scsi: Scsi) -> None:
    assert len(scsi.good(cdbs.inquiry(alloc=5))) == 5
    assert len(scsi.good(cdbs.inquiry(0x83, alloc=4))) == 4


def test_supported_pages_are_sorted_and_all_answer(scsi: Scsi) -> None:
    data = scsi.good(cdbs.inquiry(0x00))
    pages = list(data[4 : 4 + data[3]])
    assert pages == sorted(pages) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    for page in pages:
        assert scsi.good(cdbs.inquiry(page))[1] == page


def test_unit_serial_is_the_lun_uuid(scsi: Scsi) -> None:
    data = scsi.good(cdbs.inquiry(0x80))
    assert data[4:].decode() == scsi.disk.record.uuid


def designators(page: bytes) -> list[tuple[int, int, int, int, bytes]]:
    """(code set, piv+association, type, protocol, value) of each descriptor."""
    out, at = [], 4
    while at < len(page):
        length = page[at + 3]
        value = page[at + 4 : at + 4 + length]
        out.append((page[at] & 0x0F, page[at + 1] >> 4, page[at + 1] & 0x0F, page[at] >> 4, value))
        at += 4 + length
    return out


def test_device_identification_names_lun_and_target_port(scsi: Scsi) -> None:
    found = designators(scsi.good(cdbs.inquiry(0x83)))
    naa = [d for d in found if d[2] == 0x3]
    assert len(naa) == 1
    assert naa[0][:2] == (1, 0)
    value = int.from_bytes(naa[0][4], "big")
    assert value >> 60 == 3
    assert value & ((1 << 60) - 1) == uuid.UUID(scsi.disk.record.uuid).int & ((1 << 60) - 1)
    relative = [d for d in found if d[2] == 0x4]
    assert relative
    assert relative[0][1] == 0x9
    assert relative[0][3] == 5
    assert int.from_bytes(relative[0][4], "big") == 1
    names = {d[4].rstrip(b"\0").decode() for d in found if d[2] == 0x8}
    assert names == {f"{TARGET},t,0x0001", TARGET}


def test_naa_differs_between_luns(scsi: Scsi) -> None:
    scsi.array.create_lun("other", 1 << 20, number=1)
    scsi.attach(lun=1)
    first = designators(scsi.good(cdbs.inquiry(0x83)))[0][4]
    second = designators(scsi.good(cdbs.inquiry(0x83), lun=1))[0][4]
    assert first != second


def test_block_limits(scsi: Scsi) -> None:
    data = scsi.good(cdbs.inquiry(0xB0))
    assert int.from_bytes(data[2:4], "big") == 0x3C
    assert data[4] & 1  # WSNZ
    assert data[5] > 0  # COMPARE AND WRITE
    assert int.from_bytes(data[8:12], "big") == 16384
    assert int.from_bytes(data[20:24], "big") > 0
    assert int.from_bytes(data[24:28], "big") > 0
    assert int.from_bytes(data[36:44], "big") > 0


def test_provisioning_page(scsi: Scsi) -> None:
    data = scsi.good(cdbs.inquiry(0xB2))
    assert data[5] & 0xE0 == 0xE0  # LBPU, LBPWS, LBPWS10
    assert data[5] & 0x04  # LBPRZ
    assert data[6] & 0x07 == 2  # thin provisioned


def test_characteristics_page_reports_non_rotating(scsi: Scsi) -> None:
    assert scsi.good(cdbs.inquiry(0xB1))[4:6] == b"\x00\x01"


def test_unknown_vpd_page_points_at_byte2(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.inquiry(0x99)), ILLEGAL_REQUEST, 0x24, 0, pointer=(2, None))


def test_page_code_without_evpd_is_invalid(scsi: Scsi) -> None:
    cdb = bytes((0x12, 0, 0x80, 0, 255, 0))
    assert_sense(scsi.run(cdb), ILLEGAL_REQUEST, 0x24, 0, pointer=(2, None))


def test_inquiry_of_an_absent_or_masked_lun(scsi: Scsi) -> None:
    assert scsi.good(cdbs.inquiry(), lun=7)[0] == 0x7F
    masked = nexus(access=LunAccess(visible=frozenset({5})))
    assert scsi.good(cdbs.inquiry(), nexus=masked)[0] == 0x7F


# -- MODE SENSE / SELECT ---------------------------------------------------------


def pages_of(data: bytes, header: int) -> dict[int, bytes]:
    out, at = {}, header
    while at < len(data):
        out[data[at] & 0x3F] = data[at : at + 2 + data[at + 1]]
        at += 2 + data[at + 1]
    return out


def test_mode_sense6_caching_page(scsi: Scsi) -> None:
    data = scsi.good(cdbs.mode_sense6(0x08))
    assert data[0] == len(data) - 1
    assert data[2] & 0x80 == 0
    assert data[2] & 0x10
    assert data[3] == 8
    assert int.from_bytes(data[4:8], "big") == scsi.disk.size // 512
    assert int.from_bytes(data[9:12], "big") == 512
    caching = pages_of(data, 12)[0x08]
    assert caching[1] == 0x12
    assert caching[2] & 0x04


def test_mode_sense_all_pages(scsi: Scsi) -> None:
    data = scsi.good(cdbs.mode_sense6(0x3F, dbd=True))
    assert data[3] == 0
    assert {0x08, 0x0A} <= set(pages_of(data, 4))
    data10 = scsi.good(cdbs.mode_sense10(0x3F))
    assert int.from_bytes(data10[0:2], "big") == len(data10) - 2
    assert {0x08, 0x0A} <= set(pages_of(data10, 8 + int.from_bytes(data10[6:8], "big")))


def test_mode_sense10_long_block_descriptor(scsi: Scsi) -> None:
    data = scsi.good(cdbs.mode_sense10(0x0A, llbaa=True))
    assert data[4] & 1
    assert int.from_bytes(data[6:8], "big") == 16
    assert int.from_bytes(data[8:16], "big") == scsi.disk.size // 512
    assert pages_of(data, 24)[0x0A][1] == 0x0A


def test_mode_sense6_is_cut_to_the_allocation_length(scsi: Scsi) -> None:
    assert len(scsi.good(cdbs.mode_sense6(0x3F, alloc=4))) == 4


@pytest.mark.parametrize("how", ["flag", "guard", "initiator"])
def test_mode_sense_write_protect_bit(scsi: Scsi, how: str) -> None:
    who = None
    if how == "flag":
        scsi.array.set_read_only("disk", True)
    elif how == "guard":
        scsi.disk.write_guards["mirror"] = "target of synchronised mirror m1"
    else:
        who = nexus(access=LunAccess(read_only=frozenset({0})))
    assert scsi.good(cdbs.mode_sense6(0x08), nexus=who)[2] & 0x80
    assert scsi.good(cdbs.mode_sense10(0x08), nexus=who)[3] & 0x80


def test_mode_sense_saved_values_are_not_supported(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.mode_sense6(0x08, pc=3)), ILLEGAL_REQUEST, 0x39, 0x00)


def test_mode_sense_unknown_page_points_at_the_page_code(scsi: Scsi) -> None:
    result = scsi.run(cdbs.mode_sense6(0x2A))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(2, 5))


def test_mode_select_of_the_current_values_is_accepted(scsi: Scsi) -> None:
    current = scsi.good(cdbs.mode_sense6(0x08, dbd=True))
    params = bytes(4) + current[4:]
    scsi.good(bytes((0x15, 0x10, 0, 0, len(params), 0)), params)


def test_mode_select_of_a_change_is_refused(scsi: Scsi) -> None:
    current = bytearray(scsi.good(cdbs.mode_sense6(0x08, dbd=True)))
    current[4 + 2] &= ~0x04  # clear WCE
    params = bytes(4) + bytes(current[4:])
    result = scsi.run(bytes((0x15, 0x10, 0, 0, len(params), 0)), params)
    assert_sense(result, ILLEGAL_REQUEST, 0x26, 0x00, pointer=(6, None), in_cdb=False)
