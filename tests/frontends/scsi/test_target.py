"""Dispatch: unit attentions, LUN masking, REPORT LUNS, opcodes, hooks, errors."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from lunseal.engine.backends.layers import FaultyBackend
from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.attention import UnitAttentions
from lunseal.frontends.scsi.hooks import VendorCommands
from lunseal.frontends.scsi.interface import (
    GOOD,
    RESERVATION_CONFLICT,
    LunAccess,
    Nexus,
    ScsiCommand,
    ScsiResult,
)
from lunseal.frontends.scsi.opcodes import COMMANDS
from lunseal.frontends.scsi.sense import (
    ILLEGAL_REQUEST,
    MEDIUM_ERROR,
    NOT_READY,
    UNIT_ATTENTION,
)
from lunseal.frontends.scsi.target import ScsiTarget
from tests.frontends.scsi import cdbs
from tests.frontends.scsi.conftest import MiB, Scsi, nexus
from tests.frontends.scsi.sensecheck import assert_sense

OTHER = nexus("iqn.2026-12.test:host2", "0x23d000000002")


def test_first_command_of_a_new_nexus_gets_power_on_reset(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.TUR, nexus=OTHER), UNIT_ATTENTION, 0x29, 0x00)
    assert scsi.run(cdbs.TUR, nexus=OTHER).status == GOOD


@pytest.mark.parametrize("cdb", [cdbs.inquiry(), cdbs.report_luns()])
def test_inquiry_and_report_luns_neither_report_nor_clear_attention(scsi: Scsi, cdb: bytes) -> None:
    assert scsi.run(cdb, nexus=OTHER).status == GOOD
    assert_sense(scsi.run(cdbs.TUR, nexus=OTHER), UNIT_ATTENTION, 0x29, 0x00)


def test_request_sense_returns_and_clears_the_attention(scsi: Scsi) -> None:
    data = scsi.good(bytes((0x03, 0, 0, 0, 252, 0)), nexus=OTHER)
    assert (data[2], data[12], data[13]) == (UNIT_ATTENTION, 0x29, 0x00)
    assert scsi.run(cdbs.TUR, nexus=OTHER).status == GOOD
    data = scsi.good(bytes((0x03, 0, 0, 0, 252, 0)), nexus=OTHER)
    assert data[0] == 0x70
    assert (data[2], data[12], data[13]) == (0, 0, 0)
    assert len(data) == 18


def test_request_sense_descriptor_format_is_refused(scsi: Scsi) -> None:
    result = scsi.run(bytes((0x03, 1, 0, 0, 252, 0)))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 0))


def test_growing_the_lun_raises_capacity_changed_once_per_nexus(scsi: Scsi) -> None:
    scsi.attach(OTHER)
    scsi.array.grow_lun("disk", 32 * MiB)
    for who in (scsi.nexus, OTHER):
        assert_sense(scsi.run(cdbs.TUR, nexus=who), UNIT_ATTENTION, 0x2A, 0x09)
        assert scsi.run(cdbs.TUR, nexus=who).status == GOOD
    data = scsi.good(bytes((0x25,)) + bytes(9))
    assert int.from_bytes(data[0:4], "big") == 32 * MiB // 512 - 1


def test_lun_reset_raises_attention_for_every_nexus(scsi: Scsi) -> None:
    scsi.attach(OTHER)
    scsi.target.reset_lun(scsi.nexus, 0)
    for who in (scsi.nexus, OTHER):
        assert_sense(scsi.run(cdbs.TUR, nexus=who), UNIT_ATTENTION, 0x29, 0x03)
        assert scsi.run(cdbs.TUR, nexus=who).status == GOOD


def test_target_reset_raises_attention_on_every_lun(scsi: Scsi) -> None:
    scsi.array.create_lun("two", MiB, number=2)
    scsi.attach(lun=2)
    scsi.target.reset_target(scsi.nexus)
    for lun in (0, 2):
        assert_sense(scsi.run(cdbs.TUR, lun=lun), UNIT_ATTENTION, 0x29, 0x00)
        assert scsi.run(cdbs.TUR, lun=lun).status == GOOD


def test_a_gone_nexus_starts_over_with_power_on(scsi: Scsi) -> None:
    scsi.target.nexus_gone(scsi.nexus)
    assert_sense(scsi.run(cdbs.TUR), UNIT_ATTENTION, 0x29, 0x00)


def test_attention_queue_is_bounded() -> None:
    attentions = UnitAttentions()

    @dataclass
    class Rec:
        uuid: str = "u"

    @dataclass
    class FakeLun:
        record: Rec = field(default_factory=Rec)
        size: int = 512

    lun = FakeLun()
    attentions.admit(lun, "p")  # type: ignore[arg-type]
    for i in range(100):
        attentions.post("u", (0x2A, i))
    taken = 0
    while attentions.take(lun, "p") is not None:  # type: ignore[arg-type]
        taken += 1
    assert taken == 8


def test_absent_lun_is_not_supported(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.TUR, lun=9), ILLEGAL_REQUEST, 0x25, 0x00)
    data = scsi.good(bytes((0x03, 0, 0, 0, 252, 0)), lun=9)
    assert (data[2], data[12]) == (ILLEGAL_REQUEST, 0x25)


def test_masked_lun_is_invisible(scsi: Scsi) -> None:
    scsi.array.create_lun("two", MiB, number=2)
    masked = nexus(access=LunAccess(visible=frozenset({2})))
    assert scsi.target.lun(masked, 0) is None
    assert scsi.target.lun_numbers(masked) == [2]
    assert_sense(scsi.run(cdbs.rw10(0x28, 0, 1), nexus=masked), ILLEGAL_REQUEST, 0x25, 0x00)


def luns_of(data: bytes) -> list[bytes]:
    n = int.from_bytes(data[0:4], "big") // 8
    return [data[8 + 8 * i : 16 + 8 * i] for i in range(n)]


def test_report_luns_lists_visible_luns_with_their_addresses(scsi: Scsi) -> None:
    scsi.array.create_lun("two", MiB, number=2)
    scsi.array.create_lun("big", MiB, number=300)
    entries = luns_of(scsi.good(cdbs.report_luns()))
    assert entries == [bytes(8), b"\x00\x02" + bytes(6), b"\x41\x2c" + bytes(6)]
    assert luns_of(scsi.good(cdbs.report_luns(select=2))) == entries
    assert luns_of(scsi.good(cdbs.report_luns(select=1))) == []
    masked = nexus(access=LunAccess(visible=frozenset({2})))
    assert luns_of(scsi.good(cdbs.report_luns(), nexus=masked)) == [b"\x00\x02" + bytes(6)]
    # REPORT LUNS works through LUN 0 even when LUN 0 is not there for the initiator.
    assert scsi.run(cdbs.report_luns(), nexus=masked, lun=0).status == GOOD


def test_report_luns_bad_select_and_short_allocation(scsi: Scsi) -> None:
    assert_sense(scsi.run(cdbs.report_luns(select=3)), ILLEGAL_REQUEST, 0x24, 0, pointer=(2, None))
    assert_sense(scsi.run(cdbs.report_luns(alloc=8)), ILLEGAL_REQUEST, 0x24, 0, pointer=(6, None))


def test_unknown_opcode(scsi: Scsi) -> None:
    result = scsi.run(bytes((0x06, 0, 0, 0, 0, 0)))
    assert_sense(result, ILLEGAL_REQUEST, 0x20, 0x00)


def test_unknown_service_action_points_at_byte1(scsi: Scsi) -> None:
    result = scsi.run(bytes((0x9E, 0x1F)) + bytes(14))
    assert_sense(result, ILLEGAL_REQUEST, 0x24, 0x00, pointer=(1, 4))


def test_vendor_opcodes_go_to_the_state_commands_hook(scsi: Scsi) -> None:
    seen: list[bytes] = []

    def execute(lun: Lun, cmd: ScsiCommand) -> ScsiResult:
        seen.append(bytes(cmd.cdb))
        return ScsiResult(data=b"state")

    scsi.target.vendor = VendorCommands(execute, lambda cdb: 7, lambda i, t: None)
    cdb = bytes((0xC5,)) + bytes(15)
    assert scsi.good(cdb) == b"state"
    assert seen == [cdb]
    assert scsi.target.data_out_length(scsi.nexus, 0, cdb) == 7
    scsi.target.vendor = None
    assert_sense(scsi.run(cdb), ILLEGAL_REQUEST, 0x20, 0x00)
    assert scsi.target.data_out_length(scsi.nexus, 0, cdb) == 0


def test_the_vendor_commands_hear_when_a_nexus_ends(scsi: Scsi) -> None:
    """The state commands keep CHECK TOKEN answers per nexus; they must go with it."""
    gone: list[tuple[str, str]] = []
    assert scsi.target.vendor is not None
    scsi.target.vendor = VendorCommands(
        scsi.target.vendor.execute,
        scsi.target.vendor.data_out_length,
        lambda i, t: gone.append((i, t)),
    )
    scsi.target.nexus_gone(scsi.nexus)
    assert gone == [(scsi.nexus.initiator_port, scsi.nexus.target_port)]


def test_reservation_commands_are_unknown_without_a_store(scsi: Scsi) -> None:
    assert_sense(scsi.run(bytes((0x16, 0, 0, 0, 0, 0))), ILLEGAL_REQUEST, 0x20, 0x00)
    listed = {d[0] for d in descriptors(scsi.good(cdbs.rsoc()))}
    assert not listed & {0x16, 0x17, 0x5E, 0x5F}


def descriptors(data: bytes) -> list[bytes]:
    length = int.from_bytes(data[0:4], "big")
    step = 20 if data[4 + 5] & 0x02 else 8
    return [data[i : i + step] for i in range(4, 4 + length, step)]


def test_rsoc_all_lists_every_command_and_one_command_agrees(scsi: Scsi) -> None:
    listed = descriptors(scsi.good(cdbs.rsoc()))
    assert len(listed) == len([c for c in COMMANDS if c.kind != "reservation"])
    for d in listed:
        op, sa, servactv = d[0], int.from_bytes(d[2:4], "big"), d[5] & 1
        one = scsi.good(cdbs.rsoc(2 if servactv else 1, op, sa))
        assert one[1] & 0x07 == 3
        size = int.from_bytes(one[2:4], "big")
        assert size == int.from_bytes(d[6:8], "big")
        assert one[4] == op
        wrong = scsi.run(cdbs.rsoc(1 if servactv else 2, op, sa))
        assert_sense(wrong, ILLEGAL_REQUEST, 0x24, 0x00)


def test_rsoc_usage_data_shows_dpo_fua_for_reads_and_writes(scsi: Scsi) -> None:
    for op in (0x28, 0x2A, 0xA8, 0xAA, 0x88, 0x8A, 0x89):
        assert scsi.good(cdbs.rsoc(1, op))[5] & 0x18 == 0x18


def test_rsoc_with_timeouts(scsi: Scsi) -> None:
    listed = descriptors(scsi.good(cdbs.rsoc(rctd=True)))
    assert all(d[5] & 0x02 and d[8:10] == b"\x00\x0a" for d in listed)
    one = scsi.good(cdbs.rsoc(1, 0x28, rctd=True))
    assert one[1] & 0x80
    assert len(one) == 4 + 10 + 12


def test_rsoc_unsupported_opcode_says_so(scsi: Scsi) -> None:
    assert scsi.good(cdbs.rsoc(1, 0x06))[1] & 0x07 == 1


def test_data_out_lengths(scsi: Scsi) -> None:
    who = scsi.nexus
    length = scsi.target.data_out_length
    assert length(who, 0, cdbs.rw10(0x2A, 0, 8)) == 4096
    assert length(who, 0, cdbs.rw6(0x0A, 0, 0)) == 256 * 512
    assert length(who, 0, cdbs.rw16(0x8A, 0, 3)) == 1536
    assert length(who, 0, cdbs.rw12(0xAE, 0, 2)) == 1024
    assert length(who, 0, cdbs.rw10(0x28, 0, 8)) == 0
    assert length(who, 0, cdbs.rw10(0x2F, 0, 8)) == 0
    assert length(who, 0, cdbs.rw10(0x2F, 0, 8, flags=2)) == 4096
    assert length(who, 0, cdbs.rw10(0x2F, 0, 8, flags=6)) == 512
    assert length(who, 0, cdbs.caw(0, 2)) == 2048
    assert length(who, 0, cdbs.rw10(0x41, 0, 8)) == 512
    assert length(who, 0, cdbs.rw16(0x93, 0, 8, flags=1)) == 0
    assert length(who, 0, cdbs.unmap(40)) == 40
    assert length(who, 0, bytes((0x15, 0, 0, 0, 28, 0))) == 28
    assert length(who, 0, bytes((0x9E, 0x1F)) + bytes(14)) == 0
    assert length(who, 0, bytes((0xC0,)) + bytes(15)) == 0


def test_unavailable_lun_is_not_ready(scsi: Scsi) -> None:
    scsi.disk.unavailable = "backing file missing"
    assert_sense(scsi.run(cdbs.TUR), NOT_READY, 0x04, 0x00)
    assert scsi.run(cdbs.inquiry()).status == GOOD


def test_backend_failure_is_a_medium_error(scsi: Scsi) -> None:
    layer = scsi.disk.push_layer(FaultyBackend)
    layer.fail_writes = True
    assert_sense(scsi.run(cdbs.rw10(0x2A, 0, 1), bytes(512)), MEDIUM_ERROR, 0x0C, 0x00)
    layer.fail_writes = False


def test_execute_never_raises(scsi: Scsi) -> None:
    """A bug in a handler becomes HARDWARE ERROR, not an exception in the transport."""
    broken = ScsiCommand(0, cdbs.rw10(0x2A, 0, 1), scsi.nexus, data_out=object())  # type: ignore[arg-type]
    result = scsi.disk.run(lambda: scsi.target.execute(broken))
    assert_sense(result, 0x4, 0x44, 0x00)


@dataclass
class Store:
    """A reservation store standing in for ``reservations.py`` (not written yet)."""

    holder: str = ""
    released: list[str] = field(default_factory=list)

    def conflicts(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bool:
        return bool(self.holder) and nexus.initiator_port != self.holder and cdb[0] == 0x2A

    def execute(self, lun: Lun, cmd: ScsiCommand, attentions: UnitAttentions) -> ScsiResult:
        self.holder = cmd.nexus.initiator_port
        return ScsiResult()

    def reset_lun(self, lun: Lun) -> None:
        self.released.append(lun.name)

    def nexus_gone(self, nexus: Nexus) -> None:
        self.released.append(nexus.initiator_port)


def test_reservation_hook(scsi: Scsi) -> None:
    store = Store()
    scsi.target = ScsiTarget(scsi.array, store)
    scsi.attach()
    scsi.attach(OTHER)
    scsi.good(bytes((0x16, 0, 0, 0, 0, 0)))
    assert store.holder == scsi.nexus.initiator_port
    assert scsi.run(cdbs.rw10(0x2A, 0, 1), bytes(512), nexus=OTHER).status == RESERVATION_CONFLICT
    assert scsi.run(cdbs.rw10(0x2A, 0, 1), bytes(512)).status == GOOD
    assert 0x5E in {d[0] for d in descriptors(scsi.good(cdbs.rsoc()))}
    scsi.target.reset_lun(scsi.nexus, 0)
    scsi.target.nexus_gone(OTHER)
    assert store.released == ["disk", OTHER.initiator_port]
