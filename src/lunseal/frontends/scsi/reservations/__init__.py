"""SCSI reservations: SPC-4 persistent reservations and the older RESERVE/RELEASE(6).

The target (``target.py``) asks :meth:`Reservations.conflict` before it runs
any command on a LUN and answers RESERVATION CONFLICT when it says so; it
hands PERSISTENT RESERVE IN/OUT, RESERVE(6) and RELEASE(6) to the methods of
the same names, and tells this class about LUN resets, target resets and ended
sessions.  PERSISTENT RESERVE OUT returns the unit attentions the target must
queue (SPC-4 5.13.11: registrations preempted, reservations preempted,
reservations released), each for one initiator port.

Persistent state (registrations, the reservation, the generation and APTPL)
is written to the catalog before a command completes, so nothing a host was
told survives only in memory.  A clean restart of the array keeps it all;
after an unclean stop (a crash, the machine losing power) only the state of
LUNs whose last registration asked for APTPL is kept - what SPC-4 requires of
a loss of power.  RESERVE(6) reservations belong to one I_T nexus and are never
persistent.

Command classes through a reservation (SPC-4 5.13.1, tables 47 and SBC-3 4.17):
commands that never touch the medium are always allowed, reads are allowed
through the Write Exclusive types only, everything else (writes, cache and
mode commands, unknown commands) conflicts for I_T nexuses that neither hold
the reservation nor are registered under a registrants-only or all-registrants
type.  Calls may come from any LUN worker and from the event loop (resets,
logouts), so all state is under one lock.

Layout: ``spc`` codes, limits and errors; ``rules`` which commands conflict and
helpers on one LUN's record; ``actions`` the PERSISTENT RESERVE OUT service
actions as pure functions; ``data`` PERSISTENT RESERVE IN data and TransportIDs;
this module the state of every LUN and the target's entry points.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol

from lunseal.engine.pr_store import ItNexus, PrRecord
from lunseal.frontends.scsi.interface import (
    RESERVATION_CONFLICT,
    Nexus,
    ScsiCommand,
    ScsiResult,
)
from lunseal.frontends.scsi.reservations.actions import (
    SERVICE_ACTIONS,
    data_out_length,
    decode_out,
    parameter_list_length,
)
from lunseal.frontends.scsi.reservations.data import (
    parse_transport_id,
    read_full_status,
    read_keys,
    read_reservation,
    report_capabilities,
    transport_id,
)
from lunseal.frontends.scsi.reservations.rules import (
    RESERVE_RELEASE,
    always_allowed,
    find,
    holds,
    is_read,
    it_nexus,
    through_reserve6,
)
from lunseal.frontends.scsi.reservations.spc import (
    CLEAR,
    EXCLUSIVE_TYPES,
    MAX_PARAMETERS,
    MAX_REGISTRATIONS,
    PERSISTENT_RESERVE_IN,
    PERSISTENT_RESERVE_OUT,
    PREEMPT,
    PREEMPT_AND_ABORT,
    READ_FULL_STATUS,
    READ_KEYS,
    READ_RESERVATION,
    REGISTER,
    REGISTER_AND_IGNORE,
    REGISTER_AND_MOVE,
    REGISTRANTS_HAVE_ACCESS,
    RELATIVE_TARGET_PORT,
    RELEASE,
    RELEASE_6,
    REPORT_CAPABILITIES,
    RESERVE,
    RESERVE_6,
    RESERVE_10,
    ReservationConflict,
    UnitAttention,
    conflict_error,
)
from lunseal.frontends.scsi.sense import invalid_field, invalid_opcode

if TYPE_CHECKING:
    from lunseal.engine.array import Array
    from lunseal.engine.lun import Lun

log = logging.getLogger(__name__)

__all__ = [
    "CLEAR",
    "MAX_PARAMETERS",
    "MAX_REGISTRATIONS",
    "PREEMPT",
    "PREEMPT_AND_ABORT",
    "READ_FULL_STATUS",
    "READ_KEYS",
    "READ_RESERVATION",
    "REGISTER",
    "REGISTER_AND_IGNORE",
    "REGISTER_AND_MOVE",
    "RELATIVE_TARGET_PORT",
    "RELEASE",
    "REPORT_CAPABILITIES",
    "RESERVE",
    "AttentionQueue",
    "PrStore",
    "ReservationConflict",
    "Reservations",
    "UnitAttention",
    "data_out_length",
    "parameter_list_length",
    "parse_transport_id",
    "transport_id",
]


class AttentionQueue(Protocol):
    """Where the target queues unit attentions (``attention.UnitAttentions``)."""

    def post(
        self, lun_uuid: str, condition: tuple[int, int], *, ports: set[str] | None = None
    ) -> None: ...


class PrStore(Protocol):
    def load_all(self) -> dict[str, PrRecord]: ...
    def save(self, lun_uuid: str, rec: PrRecord) -> None: ...
    def drop_volatile(self) -> int: ...


class Reservations:
    """Persistent reservations and RESERVE(6) of every LUN of one array."""

    def __init__(self, store: PrStore, *, power_lost: bool = False) -> None:
        self._store = store
        self._lock = threading.Lock()
        if power_lost:
            dropped = store.drop_volatile()
            if dropped:
                log.warning(
                    "the array did not stop cleanly: dropped the persistent reservations "
                    "of %d LUN(s) registered without APTPL",
                    dropped,
                )
        self._records: dict[str, PrRecord] = store.load_all()
        #: RESERVE(6) holders, by LUN UUID.
        self._reserve6: dict[str, ItNexus] = {}
        #: One PERSISTENT RESERVE OUT at a time per LUN, held across its catalog
        #: commit, so that commit never stalls the checks of other LUNs.
        self._out_locks: dict[str, threading.Lock] = {}

    @classmethod
    def for_array(cls, array: Array) -> Reservations:
        return cls(array.catalog.reservations, power_lost=not array.last_shutdown_clean)

    def record(self, lun_uuid: str) -> PrRecord:
        with self._lock:
            return self._records.get(lun_uuid, PrRecord())

    # -- what the target's dispatcher calls (``hooks.ReservationStore``) --------------

    def conflicts(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bool:
        return self.conflict(nexus, lun, cdb)

    def execute(self, lun: Lun, cmd: ScsiCommand, attentions: AttentionQueue) -> ScsiResult:
        """Run PERSISTENT RESERVE IN/OUT, RESERVE(6) or RELEASE(6).

        RESERVATION CONFLICT comes back as that status; other errors raise
        :class:`~lunseal.frontends.scsi.sense.SenseError` for the dispatcher."""
        cdb = bytes(cmd.cdb)
        op = cdb[0] if cdb else -1
        try:
            if op == PERSISTENT_RESERVE_IN:
                return ScsiResult(data=self.persistent_in(cmd.nexus, lun, cdb))
            if op == PERSISTENT_RESERVE_OUT:
                for ua in self.persistent_out(cmd.nexus, lun, cdb, cmd.data_out):
                    attentions.post(lun.record.uuid, (ua.asc, ua.ascq), ports={ua.initiator_port})
            elif op == RESERVE_6:
                self.reserve6(cmd.nexus, lun)
            elif op == RELEASE_6:
                self.release6(cmd.nexus, lun)
            else:
                raise invalid_opcode(op)
        except ReservationConflict:
            return ScsiResult(status=RESERVATION_CONFLICT)
        return ScsiResult()

    def reset_lun(self, lun: Lun) -> None:
        self.reset(lun)

    # -- before every command ------------------------------------------------------

    def conflict(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bool:
        """Whether the command must end with RESERVATION CONFLICT, unexecuted."""
        if not cdb:
            return False
        uuid, who = lun.record.uuid, it_nexus(nexus)
        with self._lock:
            rec = self._records.get(uuid)
            holder6 = self._reserve6.get(uuid)
            if cdb[0] in RESERVE_RELEASE:
                return self._reserve_release_conflicts(rec, holder6, who, cdb[0])
            if holder6 is not None:
                # SPC-2 reservations exclude persistent ones "regardless of initiator".
                if cdb[0] in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT):
                    return True
                return holder6 != who and not through_reserve6(cdb)
            if rec is None or rec.type is None or holds(rec, who):
                return False
            if rec.type in REGISTRANTS_HAVE_ACCESS and find(rec, who) is not None:
                return False
            if always_allowed(cdb):
                return False
            if is_read(cdb):
                return rec.type in EXCLUSIVE_TYPES
            return True

    @staticmethod
    def _reserve_release_conflicts(
        rec: PrRecord | None, holder6: ItNexus | None, who: ItNexus, opcode: int
    ) -> bool:
        # REPORT CAPABILITIES says CRH=0: while any I_T nexus is registered,
        # every RESERVE and RELEASE conflicts.
        if rec is not None and rec.registrations:
            return True
        if opcode in (RESERVE_6, RESERVE_10):
            return holder6 is not None and holder6 != who
        return False  # RELEASE by a non-holder does nothing, successfully

    # -- RESERVE(6) / RELEASE(6) ---------------------------------------------------

    def reserve6(self, nexus: Nexus, lun: Lun) -> None:
        uuid, who = lun.record.uuid, it_nexus(nexus)
        with self._lock:
            if self._reserve_release_conflicts(
                self._records.get(uuid), self._reserve6.get(uuid), who, RESERVE_6
            ):
                raise conflict_error(f"LUN {lun.name} is reserved by another I_T nexus")
            self._reserve6[uuid] = who

    def release6(self, nexus: Nexus, lun: Lun) -> None:
        uuid, who = lun.record.uuid, it_nexus(nexus)
        with self._lock:
            rec = self._records.get(uuid)
            if rec is not None and rec.registrations:
                raise conflict_error(f"LUN {lun.name} has persistent reservation registrations")
            if self._reserve6.get(uuid) == who:
                del self._reserve6[uuid]

    def reset(self, lun: Lun) -> None:
        """LUN RESET: its RESERVE(6) reservation goes; persistent ones stay."""
        with self._lock:
            self._reserve6.pop(lun.record.uuid, None)

    def reset_target(self) -> None:
        """TARGET WARM/COLD RESET: every RESERVE(6) reservation goes."""
        with self._lock:
            self._reserve6.clear()

    def nexus_gone(self, nexus: Nexus) -> None:
        """The I_T nexus ended (logout, dropped connection): its RESERVE(6)
        reservations go; registrations stay (SPC-4 5.13.2)."""
        who = it_nexus(nexus)
        with self._lock:
            for uuid in [u for u, holder in self._reserve6.items() if holder == who]:
                del self._reserve6[uuid]

    # -- PERSISTENT RESERVE IN -----------------------------------------------------

    def persistent_in(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bytes:
        """The parameter data, cut to the CDB's allocation length."""
        if len(cdb) < 10:
            raise invalid_field(0, why="PERSISTENT RESERVE IN needs a 10-byte CDB")
        action = cdb[1] & 0x1F
        allocation = int.from_bytes(cdb[7:9], "big")
        rec = self.record(lun.record.uuid)
        if action == READ_KEYS:
            data = read_keys(rec)
        elif action == READ_RESERVATION:
            data = read_reservation(rec)
        elif action == REPORT_CAPABILITIES:
            data = report_capabilities(rec)
        elif action == READ_FULL_STATUS:
            data = read_full_status(rec)
        else:
            raise invalid_field(1, 4, f"service action {action:#04x} is not supported")
        return data[:allocation]

    # -- PERSISTENT RESERVE OUT ----------------------------------------------------

    def persistent_out(
        self, nexus: Nexus, lun: Lun, cdb: bytes, params: bytes | bytearray | memoryview
    ) -> list[UnitAttention]:
        """Carry out the service action; the unit attentions the target must queue.

        Raises :class:`ReservationConflict` or a sense error; the state is
        saved in the catalog before this returns, and is unchanged when it raises.
        """
        out = decode_out(nexus, cdb, bytes(params))
        uuid = lun.record.uuid
        with self._lock:
            out_lock = self._out_locks.setdefault(uuid, threading.Lock())
        with out_lock:
            rec = self.record(uuid)
            new, uas = SERVICE_ACTIONS[out.action](rec, out)
            if new != rec:
                self._store.save(uuid, new)
                with self._lock:
                    self._records[uuid] = new
        return uas
