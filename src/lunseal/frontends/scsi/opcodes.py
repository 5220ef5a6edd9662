"""The command table: what each operation code is, who runs it, how much
data-out it takes, and the CDB usage data REPORT SUPPORTED OPERATION CODES reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from lunseal.frontends.scsi import block, mode, unit
from lunseal.frontends.scsi.cdb import Request, be
from lunseal.frontends.scsi.interface import ScsiResult
from lunseal.frontends.scsi.sense import invalid_field

Handler = Callable[[Request], ScsiResult]

# Operation codes the dispatcher itself runs (they need the target, not just the LUN).
INQUIRY = 0x12
REQUEST_SENSE = 0x03
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
RSOC = 0x0C
SERVICE_ACTION_IN_16 = 0x9E
# Reservations: run by the ReservationStore (``reservations.py``).
RESERVE6 = 0x16
RELEASE6 = 0x17
PR_IN = 0x5E
PR_OUT = 0x5F
#: Operation codes of vendor-specific commands (the in-band state commands).
VENDOR_FIRST = 0xC0


class Kind:
    LUN = "lun"  # handler(Request)
    TARGET = "target"  # the dispatcher runs it
    RESERVATION = "reservation"  # the ReservationStore runs it


@dataclass(frozen=True)
class Command:
    opcode: int
    name: str
    #: CDB usage data: byte 0 the opcode, then a mask of the bits evaluated.
    usage: bytes
    kind: str = Kind.LUN
    handler: Handler | None = None
    service_action: int | None = None
    data_out: Callable[[bytes], int] | None = None
    #: Changes data: refused while another initiator holds a conflicting reservation.
    writes: bool = False


def _usage(op: int, *masks: int) -> bytes:
    return bytes((op, *masks))


#: The most PERSISTENT RESERVE OUT parameter data taken in: a register with
#: transport IDs is far smaller; a longer list is refused by the store anyway.
PR_OUT_MAX = 8192


def _pr_out_length(cdb: bytes) -> int:
    return min(be(cdb, 5, 9), PR_OUT_MAX)


def _table() -> list[Command]:
    b, u = block, unit
    return [
        Command(0x00, "TEST UNIT READY", _usage(0x00, 0, 0, 0, 0, 7), handler=u.test_unit_ready),
        Command(REQUEST_SENSE, "REQUEST SENSE", _usage(0x03, 1, 0, 0, 0xFF, 7), Kind.TARGET),
        Command(0x08, "READ(6)", _usage(0x08, 0x1F, 0xFF, 0xFF, 0xFF, 7), handler=b.read),
        Command(
            0x0A,
            "WRITE(6)",
            _usage(0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 7),
            handler=b.write,
            data_out=b.data_out_length,
            writes=True,
        ),
        Command(INQUIRY, "INQUIRY", _usage(0x12, 1, 0xFF, 0xFF, 0xFF, 7), Kind.TARGET),
        Command(
            0x15,
            "MODE SELECT(6)",
            _usage(0x15, 0x11, 0, 0, 0xFF, 7),
            handler=mode.mode_select,
            data_out=mode.mode_select_data_out,
        ),
        Command(RESERVE6, "RESERVE(6)", _usage(0x16, 0, 0, 0, 0, 7), Kind.RESERVATION),
        Command(RELEASE6, "RELEASE(6)", _usage(0x17, 0, 0, 0, 0, 7), Kind.RESERVATION),
        Command(
            0x1A, "MODE SENSE(6)", _usage(0x1A, 0x08, 0xFF, 0xFF, 0xFF, 7), handler=mode.mode_sense6
        ),
        Command(
            0x1B, "START STOP UNIT", _usage(0x1B, 1, 0, 0x0F, 0xF7, 7), handler=u.start_stop_unit
        ),
        Command(
            0x1E,
            "PREVENT ALLOW MEDIUM REMOVAL",
            _usage(0x1E, 0, 0, 0, 3, 7),
            handler=u.prevent_allow,
        ),
        Command(
            0x25,
            "READ CAPACITY(10)",
            _usage(0x25, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0, 1, 7),
            handler=b.read_capacity10,
        ),
        _rw(0x28, "READ(10)", b.read, 10),
        _rw(0x2A, "WRITE(10)", b.write, 10, writes=True),
        _rw(0x2E, "WRITE AND VERIFY(10)", b.write_verify, 10, writes=True, flags=0xF2),
        _rw(0x2F, "VERIFY(10)", b.verify, 10, flags=0xF6),
        _rw(0x34, "PRE-FETCH(10)", b.prefetch, 10, flags=0x02),
        _rw(0x35, "SYNCHRONIZE CACHE(10)", b.synchronize_cache, 10, flags=0x06),
        Command(
            0x37,
            "READ DEFECT DATA(10)",
            _usage(0x37, 0, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 7),
            handler=u.read_defect_data10,
        ),
        Command(
            0x41,
            "WRITE SAME(10)",
            _usage(0x41, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 7),
            handler=b.write_same,
            data_out=b.data_out_length,
            writes=True,
        ),
        Command(
            0x42,
            "UNMAP",
            _usage(0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 7),
            handler=b.unmap,
            data_out=b.data_out_length,
            writes=True,
        ),
        Command(
            0x55,
            "MODE SELECT(10)",
            _usage(0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 7),
            handler=mode.mode_select,
            data_out=mode.mode_select_data_out,
        ),
        Command(
            0x5A,
            "MODE SENSE(10)",
            _usage(0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 7),
            handler=mode.mode_sense10,
        ),
        Command(
            PR_IN,
            "PERSISTENT RESERVE IN",
            _usage(0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 7),
            Kind.RESERVATION,
        ),
        Command(
            PR_OUT,
            "PERSISTENT RESERVE OUT",
            _usage(0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 7),
            Kind.RESERVATION,
            data_out=_pr_out_length,
        ),
        Command(
            0x89,
            "COMPARE AND WRITE",
            _usage(0x89, 0xF8, *[0xFF] * 8, 0, 0, 0, 0xFF, 0x1F, 7),
            handler=b.compare_and_write,
            data_out=b.data_out_length,
            writes=True,
        ),
        _rw(0x88, "READ(16)", b.read, 16),
        _rw(0x8A, "WRITE(16)", b.write, 16, writes=True),
        _rw(0x8E, "WRITE AND VERIFY(16)", b.write_verify, 16, writes=True, flags=0xF2),
        _rw(0x8F, "VERIFY(16)", b.verify, 16, flags=0xF6),
        _rw(0x90, "PRE-FETCH(16)", b.prefetch, 16, flags=0x02),
        _rw(0x91, "SYNCHRONIZE CACHE(16)", b.synchronize_cache, 16, flags=0x06),
        Command(
            0x93,
            "WRITE SAME(16)",
            _usage(0x93, 0xF9, *[0xFF] * 12, 0x1F, 7),
            handler=b.write_same,
            data_out=b.data_out_length,
            writes=True,
        ),
        Command(
            SERVICE_ACTION_IN_16,
            "READ CAPACITY(16)",
            _usage(0x9E, 0x1F, *[0] * 8, 0xFF, 0xFF, 0xFF, 0xFF, 0, 7),
            handler=b.read_capacity16,
            service_action=0x10,
        ),
        Command(
            SERVICE_ACTION_IN_16,
            "GET LBA STATUS",
            _usage(0x9E, 0x1F, *[0xFF] * 12, 0, 7),
            handler=b.get_lba_status,
            service_action=0x12,
        ),
        Command(
            REPORT_LUNS,
            "REPORT LUNS",
            _usage(0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 7),
            Kind.TARGET,
        ),
        Command(
            MAINTENANCE_IN,
            "REPORT SUPPORTED OPERATION CODES",
            _usage(0xA3, 0x1F, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 7),
            Kind.TARGET,
            service_action=RSOC,
        ),
        _rw(0xA8, "READ(12)", b.read, 12),
        _rw(0xAA, "WRITE(12)", b.write, 12, writes=True),
        _rw(0xAE, "WRITE AND VERIFY(12)", b.write_verify, 12, writes=True, flags=0xF2),
        _rw(0xAF, "VERIFY(12)", b.verify, 12, flags=0xF6),
        Command(
            0xB7,
            "READ DEFECT DATA(12)",
            _usage(0xB7, 0x1F, 0, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 7),
            handler=u.read_defect_data12,
        ),
    ]


def _rw(
    op: int, name: str, handler: Handler, size: int, *, writes: bool = False, flags: int = 0xFE
) -> Command:
    masks = {
        10: (flags, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 7),
        12: (flags, *[0xFF] * 8, 0x1F, 7),
        16: (flags, *[0xFF] * 12, 0x1F, 7),
    }[size]
    return Command(
        op,
        name,
        _usage(op, *masks),
        handler=handler,
        data_out=block.data_out_length if writes or op in (0x2F, 0xAF, 0x8F) else None,
        writes=writes,
    )


COMMANDS: list[Command] = _table()
_BY_KEY: dict[tuple[int, int | None], Command] = {(c.opcode, c.service_action): c for c in COMMANDS}
#: Operation codes whose commands are told apart by a service action in byte 1.
WITH_SERVICE_ACTIONS = {c.opcode for c in COMMANDS if c.service_action is not None}


def lookup(cdb: bytes) -> Command | None:
    """The command ``cdb`` names; ``None`` for an unknown operation code.

    An unknown service action of a known operation code is an invalid field.
    """
    op = cdb[0]
    if op not in WITH_SERVICE_ACTIONS:
        return _BY_KEY.get((op, None))
    found = _BY_KEY.get((op, cdb[1] & 0x1F))
    if found is None:
        raise invalid_field(1, 4, f"service action {cdb[1] & 0x1F:#04x} is not supported")
    return found


def report_supported(cdb: bytes, offered: Callable[[Command], bool]) -> bytes:
    """REPORT SUPPORTED OPERATION CODES parameter data (SPC-4 6.35)."""
    rctd, options = bool(cdb[2] & 0x80), cdb[2] & 0x07
    op, sa, alloc = cdb[3], be(cdb, 4, 6), be(cdb, 6, 10)
    if options == 0:
        data = _all_commands(rctd, offered)
    elif options in (1, 2, 3):
        data = _one_command(options, op, sa, rctd, offered)
    else:
        raise invalid_field(2, 2, f"reporting options {options} are not supported")
    return data[:alloc]


def _timeouts() -> bytes:
    return (10).to_bytes(2, "big") + bytes(2) + (30).to_bytes(4, "big") + (60).to_bytes(4, "big")


def _all_commands(rctd: bool, offered: Callable[[Command], bool]) -> bytes:
    out = bytearray()
    for c in filter(offered, COMMANDS):
        flags = (0x02 if rctd else 0) | (0x01 if c.service_action is not None else 0)
        sa = c.service_action or 0
        out += bytes((c.opcode, 0)) + sa.to_bytes(2, "big") + bytes((0, flags))
        out += len(c.usage).to_bytes(2, "big")
        if rctd:
            out += _timeouts()
    return len(out).to_bytes(4, "big") + bytes(out)


def _one_command(
    options: int, op: int, sa: int, rctd: bool, offered: Callable[[Command], bool]
) -> bytes:
    has_sa = op in WITH_SERVICE_ACTIONS
    if options == 1 and has_sa:
        raise invalid_field(3, None, "the operation code has service actions")
    if options == 2 and not has_sa:
        raise invalid_field(3, None, "the operation code has no service actions")
    found = _BY_KEY.get((op, sa if has_sa else None))
    if found is not None and not offered(found):
        found = None
    head = bytes((0, (0x80 if rctd else 0) | (3 if found else 1)))
    if found is None:
        return head + bytes(2)
    body = head + len(found.usage).to_bytes(2, "big") + found.usage
    return body + (_timeouts() if rctd else b"")
