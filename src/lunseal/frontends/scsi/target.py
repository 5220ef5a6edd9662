"""The SCSI target of an array: LUN lookup, masking, dispatch and unit attentions.

:meth:`ScsiTarget.execute` decodes a command, reports a pending unit attention
or a reservation conflict, and hands the command to its handler; every error
becomes CHECK CONDITION with fixed-format sense data, never an exception.
"""

from __future__ import annotations

import logging

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.errors import (
    BackendError,
    LunsealError,
    LunUnavailable,
    NoSpace,
    OutOfRange,
    ReadOnly,
)
from lunseal.frontends.scsi import inquiry, opcodes
from lunseal.frontends.scsi.attention import LUN_RESET, TARGET_RESET, UnitAttentions
from lunseal.frontends.scsi.cdb import Request, be
from lunseal.frontends.scsi.hooks import ReservationStore, VendorCommands, state_vendor_commands
from lunseal.frontends.scsi.interface import (
    CHECK_CONDITION,
    RESERVATION_CONFLICT,
    Nexus,
    ScsiCommand,
    ScsiResult,
)
from lunseal.frontends.scsi.opcodes import Command, Kind
from lunseal.frontends.scsi.sense import (
    ILLEGAL_REQUEST,
    NO_SENSE,
    SenseError,
    fixed_sense,
    hardware_error,
    invalid_field,
    invalid_opcode,
    lba_out_of_range,
    lun_not_supported,
    medium_error,
    not_ready,
    write_protected,
)

log = logging.getLogger(__name__)

#: Commands that neither report nor clear a pending unit attention (SAM-5 5.14).
NO_ATTENTION = {opcodes.INQUIRY, opcodes.REPORT_LUNS, opcodes.REQUEST_SENSE}
CDB_SIZE = 16


class ScsiTarget:
    def __init__(self, array: Array, reservations: ReservationStore | None = None) -> None:
        self.array = array
        self.reservations = reservations
        self.attentions = UnitAttentions()
        self.vendor: VendorCommands | None = state_vendor_commands(array.catalog.audit.record)

    # -- LUNs as an initiator sees them ---------------------------------------------

    def lun(self, nexus: Nexus, number: int) -> Lun | None:
        if not nexus.access.sees(number):
            return None
        return next((lun for lun in self.array.luns() if lun.record.number == number), None)

    def lun_numbers(self, nexus: Nexus) -> list[int]:
        return [
            lun.record.number for lun in self.array.luns() if nexus.access.sees(lun.record.number)
        ]

    # -- commands ---------------------------------------------------------------------

    def data_out_length(self, nexus: Nexus, number: int, cdb: bytes) -> int:
        cdb = _padded(cdb)
        try:
            if cdb[0] >= opcodes.VENDOR_FIRST:
                return self.vendor.data_out_length(cdb) if self.vendor else 0
            command = opcodes.lookup(cdb)
        except SenseError:
            return 0
        except Exception:  # a broken hook must not take the connection down
            log.exception("data-out length of CDB %s", cdb.hex())
            return 0
        if command is None or command.data_out is None or not self._offered(command):
            return 0
        return command.data_out(cdb)

    def execute(self, cmd: ScsiCommand) -> ScsiResult:
        try:
            return self._execute(cmd)
        except SenseError as exc:
            return _check(exc)
        except LunsealError as exc:
            return _check(_sense_for(exc, _padded(cmd.cdb)))
        except Exception as exc:
            log.exception("SCSI command %s on LUN %d failed", bytes(cmd.cdb).hex(), cmd.lun)
            return _check(hardware_error(f"internal error: {exc}"))

    def _execute(self, cmd: ScsiCommand) -> ScsiResult:
        cdb = _padded(cmd.cdb)
        if cdb[0] == opcodes.REPORT_LUNS:
            return self._report_luns(cdb, cmd.nexus)
        lun = self.lun(cmd.nexus, cmd.lun)
        if lun is None:
            return self._absent(cmd, cdb)
        early = self._before(cdb, lun, cmd.nexus)
        if early is not None:
            return early
        if cdb[0] >= opcodes.VENDOR_FIRST and self.vendor is not None:
            return self.vendor.execute(lun, cmd)
        command = opcodes.lookup(cdb)
        if command is None or not self._offered(command):
            raise invalid_opcode(cdb[0])
        return self._run(command, cmd, cdb, lun)

    def _before(self, cdb: bytes, lun: Lun, nexus: Nexus) -> ScsiResult | None:
        """What answers a command before its handler runs: REQUEST SENSE and
        INQUIRY, a pending unit attention, a reservation conflict."""
        op, port = cdb[0], nexus.initiator_port
        self.attentions.admit(lun, port)
        if op == opcodes.REQUEST_SENSE:
            return self._request_sense(cdb, lun, port)
        if op not in NO_ATTENTION and (attention := self.attentions.take(lun, port)):
            return _check(attention)
        if op == opcodes.INQUIRY:
            return inquiry.inquiry(cdb, lun, nexus)
        if self.reservations is not None and self.reservations.conflicts(nexus, lun, cdb):
            return ScsiResult(status=RESERVATION_CONFLICT)
        return None

    def _run(self, command: Command, cmd: ScsiCommand, cdb: bytes, lun: Lun) -> ScsiResult:
        if command.kind == Kind.RESERVATION:
            assert self.reservations is not None  # _offered
            return self.reservations.execute(lun, cmd, self.attentions)
        if command.opcode == opcodes.MAINTENANCE_IN:
            return ScsiResult(data=opcodes.report_supported(cdb, self._offered))
        if lun.unavailable:
            raise not_ready(f"LUN {lun.name} is unavailable: {lun.unavailable}")
        assert command.handler is not None
        data_out = memoryview(cmd.data_out).cast("B")
        request = Request(cdb, data_out, cmd.nexus, lun, cmd.lun, cmd.expected_length)
        return command.handler(request)

    def _offered(self, command: Command) -> bool:
        return command.kind != Kind.RESERVATION or self.reservations is not None

    def _absent(self, cmd: ScsiCommand, cdb: bytes) -> ScsiResult:
        """A command to a LUN that does not exist or is masked (SPC-4 4.6.5)."""
        if cdb[0] == opcodes.INQUIRY:
            return inquiry.inquiry(cdb, None, cmd.nexus)
        if cdb[0] == opcodes.REQUEST_SENSE:
            sense = fixed_sense(ILLEGAL_REQUEST, 0x25, 0x00)
            return ScsiResult(data=sense[: cdb[4]])
        raise lun_not_supported(cmd.lun)

    def _request_sense(self, cdb: bytes, lun: Lun, port: str) -> ScsiResult:
        if cdb[1] & 0x01:
            raise invalid_field(1, 0, "descriptor format sense data is not supported")
        attention = self.attentions.take(lun, port)
        sense = attention.sense() if attention else fixed_sense(NO_SENSE, 0, 0)
        return ScsiResult(data=sense[: cdb[4]])

    def _report_luns(self, cdb: bytes, nexus: Nexus) -> ScsiResult:
        """The LUNs this initiator sees (SPC-4 6.33); all three selections of
        SPC-4 report the same list, since there are no well-known LUNs here."""
        if cdb[2] not in (0x00, 0x01, 0x02):
            raise invalid_field(2, None, f"SELECT REPORT {cdb[2]:#04x} is not supported")
        alloc = be(cdb, 6, 10)
        if alloc < 16:
            raise invalid_field(6, None, "allocation length must be at least 16")
        numbers = [] if cdb[2] == 0x01 else self.lun_numbers(nexus)
        body = b"".join(_lun_address(n) for n in numbers)
        data = len(body).to_bytes(4, "big") + bytes(4) + body
        return ScsiResult(data=data[:alloc])

    # -- task management ----------------------------------------------------------------

    def reset_lun(self, nexus: Nexus, number: int) -> None:
        lun = self.lun(nexus, number)
        if lun is None:
            return
        self.attentions.post(lun.record.uuid, LUN_RESET)
        if self.reservations is not None:
            self.reservations.reset_lun(lun)

    def reset_target(self, nexus: Nexus) -> None:
        for lun in self.array.luns():
            self.attentions.post(lun.record.uuid, TARGET_RESET)
            if self.reservations is not None:
                self.reservations.reset_lun(lun)

    def nexus_gone(self, nexus: Nexus) -> None:
        self.attentions.forget(nexus.initiator_port)
        if self.vendor is not None:
            self.vendor.nexus_gone(nexus.initiator_port, nexus.target_port)
        if self.reservations is not None:
            self.reservations.nexus_gone(nexus)


def _padded(cdb: bytes | bytearray | memoryview) -> bytes:
    raw = bytes(cdb)
    return raw + bytes(CDB_SIZE - len(raw)) if len(raw) < CDB_SIZE else raw


def _check(error: SenseError) -> ScsiResult:
    return ScsiResult(status=CHECK_CONDITION, sense=error.sense())


def _sense_for(exc: LunsealError, cdb: bytes) -> SenseError:
    """The sense data for an engine error that escaped a handler's own checks."""
    if isinstance(exc, ReadOnly):
        return write_protected(exc.message)
    if isinstance(exc, NoSpace | OutOfRange):
        return lba_out_of_range(0, 0)
    if isinstance(exc, LunUnavailable):
        return not_ready(exc.message)
    if isinstance(exc, BackendError):
        command = _safe_lookup(cdb)
        return medium_error(exc.message, write=command is not None and command.writes)
    return hardware_error(exc.message)


def _safe_lookup(cdb: bytes) -> Command | None:
    try:
        return opcodes.lookup(cdb)
    except SenseError:
        return None


def _lun_address(number: int) -> bytes:
    """Peripheral device addressing below 256, flat space addressing above."""
    if number < 256:
        return bytes((0, number)) + bytes(6)
    return bytes((0x40 | number >> 8, number & 0xFF)) + bytes(6)
