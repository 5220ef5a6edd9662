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
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from lunseal.engine.pr_store import ItNexus, PrRecord, Registration
from lunseal.errors import LunsealError
from lunseal.frontends.scsi.interface import (
    RESERVATION_CONFLICT,
    Nexus,
    ScsiCommand,
    ScsiResult,
)
from lunseal.frontends.scsi.sense import (
    ILLEGAL_REQUEST,
    SenseError,
    invalid_field,
    invalid_opcode,
    invalid_param,
    param_length_error,
)

if TYPE_CHECKING:
    from lunseal.engine.array import Array
    from lunseal.engine.lun import Lun

log = logging.getLogger(__name__)

# Operation codes this module decides about.
PERSISTENT_RESERVE_IN = 0x5E
PERSISTENT_RESERVE_OUT = 0x5F
RESERVE_6 = 0x16
RELEASE_6 = 0x17
RESERVE_10 = 0x56
RELEASE_10 = 0x57

# PERSISTENT RESERVE IN service actions.
READ_KEYS = 0x00
READ_RESERVATION = 0x01
REPORT_CAPABILITIES = 0x02
READ_FULL_STATUS = 0x03

# PERSISTENT RESERVE OUT service actions.
REGISTER = 0x00
RESERVE = 0x01
RELEASE = 0x02
CLEAR = 0x03
PREEMPT = 0x04
PREEMPT_AND_ABORT = 0x05
REGISTER_AND_IGNORE = 0x06
REGISTER_AND_MOVE = 0x07

# Reservation types (SPC-4 table 180).
WRITE_EXCLUSIVE = 0x1
EXCLUSIVE_ACCESS = 0x3
WRITE_EXCLUSIVE_REGISTRANTS_ONLY = 0x5
EXCLUSIVE_ACCESS_REGISTRANTS_ONLY = 0x6
WRITE_EXCLUSIVE_ALL_REGISTRANTS = 0x7
EXCLUSIVE_ACCESS_ALL_REGISTRANTS = 0x8
TYPES = frozenset({1, 3, 5, 6, 7, 8})
#: Every registered I_T nexus holds these.
ALL_REGISTRANTS = frozenset({7, 8})
#: Registered I_T nexuses get the holder's access under these.
REGISTRANTS_HAVE_ACCESS = frozenset({5, 6, 7, 8})
#: Non-holders may not even read under these.
EXCLUSIVE_TYPES = frozenset({3, 6, 8})

#: The only scope SPC-4 still defines.
LU_SCOPE = 0

#: A PERSISTENT RESERVE OUT parameter list without SPEC_I_PT (SPC-4 6.16.3).
BASIC_PARAMETERS = 24
#: The longest parameter list the target accepts (it buffers no more).
MAX_PARAMETERS = BASIC_PARAMETERS
#: Registrations one LUN keeps; more gets INSUFFICIENT REGISTRATION RESOURCES.
MAX_REGISTRATIONS = 256
#: The one target port of the array, as READ FULL STATUS reports it.
RELATIVE_TARGET_PORT = 1

# Additional sense codes of unit attentions (ASC 2Ah).
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)

# SCSI protocol identifier of iSCSI, for TransportIDs (SPC-4 table 444).
_ISCSI_PROTOCOL = 0x5


class ReservationConflict(LunsealError):
    """The command is refused with status RESERVATION CONFLICT (no sense data)."""

    code = "reservation_conflict"


@dataclass(frozen=True)
class UnitAttention:
    """A unit attention the target must queue for one initiator port of the LUN."""

    initiator_port: str
    asc: int
    ascq: int


class AttentionQueue(Protocol):
    """Where the target queues unit attentions (``attention.UnitAttentions``)."""

    def post(
        self, lun_uuid: str, condition: tuple[int, int], *, ports: set[str] | None = None
    ) -> None: ...


class PrStore(Protocol):
    def load_all(self) -> dict[str, PrRecord]: ...
    def save(self, lun_uuid: str, rec: PrRecord) -> None: ...
    def drop_volatile(self) -> int: ...


def parameter_list_length(cdb: bytes) -> int:
    """The PARAMETER LIST LENGTH of a PERSISTENT RESERVE OUT CDB (bytes 5-8)."""
    return int.from_bytes(cdb[5:9], "big") if len(cdb) >= 9 else 0


def data_out_length(cdb: bytes) -> int:
    """How much data-out to take for a PERSISTENT RESERVE OUT: the parameter
    list, but never more than :data:`MAX_PARAMETERS` (a longer list is refused
    with PARAMETER LIST LENGTH ERROR all the same, without buffering it)."""
    return min(parameter_list_length(cdb), MAX_PARAMETERS)


def _nexus(nexus: Nexus) -> ItNexus:
    return (nexus.initiator_port, nexus.target_port)


def _conflict(why: str) -> ReservationConflict:
    return ReservationConflict(why)


def _invalid_release() -> SenseError:
    return SenseError(
        "RELEASE names another scope or type than the reservation's",
        ILLEGAL_REQUEST,
        0x26,
        0x04,
    )


def _no_room() -> SenseError:
    return SenseError(
        f"the LUN already has {MAX_REGISTRATIONS} registrations",
        ILLEGAL_REQUEST,
        0x55,
        0x04,
    )


# -- which commands a reservation lets through ---------------------------------------

#: Never conflict with a persistent reservation: they do not touch the medium.
#: (TEST UNIT READY is among them: REPORT CAPABILITIES says ALLOW COMMANDS 001b.)
_ALWAYS = frozenset(
    {
        0x00,  # TEST UNIT READY
        0x03,  # REQUEST SENSE
        0x12,  # INQUIRY
        0x25,  # READ CAPACITY(10)
        0x4D,  # LOG SENSE
        0xA0,  # REPORT LUNS
        PERSISTENT_RESERVE_IN,
        PERSISTENT_RESERVE_OUT,  # its service actions check keys themselves
    }
)
#: Reads: allowed through the Write Exclusive types, not the Exclusive Access ones.
_READS = frozenset(
    {
        0x08,  # READ(6)
        0x28,  # READ(10)
        0xA8,  # READ(12)
        0x88,  # READ(16)
        0x2F,  # VERIFY(10)
        0xAF,  # VERIFY(12)
        0x8F,  # VERIFY(16)
        0x34,  # PRE-FETCH(10)
        0x90,  # PRE-FETCH(16)
    }
)
_SERVICE_ACTION_IN_16 = 0x9E
_MAINTENANCE_IN = 0xA3
_PREVENT_ALLOW = 0x1E
_RESERVE_RELEASE = frozenset({RESERVE_6, RELEASE_6, RESERVE_10, RELEASE_10})
#: While a RESERVE(6) reservation is held, other I_T nexuses may still send these.
_THROUGH_RESERVE6 = frozenset({0x03, 0x12, 0xA0, RELEASE_6, RELEASE_10})


def _vendor(opcode: int) -> bool:
    # The array's in-band state commands read or hold tokens, never data:
    # a backup host must be able to use them whoever holds the LUN.
    return opcode >= 0xC0


def _prevent_off(cdb: bytes) -> bool:
    return cdb[0] == _PREVENT_ALLOW and len(cdb) > 4 and cdb[4] & 0x03 == 0


def _always_allowed(cdb: bytes) -> bool:
    op = cdb[0]
    if op in _ALWAYS or _vendor(op) or _prevent_off(cdb):
        return True
    sa = cdb[1] & 0x1F if len(cdb) > 1 else 0
    if op == _SERVICE_ACTION_IN_16:
        return sa == 0x10  # READ CAPACITY(16)
    if op == _MAINTENANCE_IN:
        return sa in (0x05, 0x0C, 0x0D)  # REPORT TARGET PORT GROUPS, SUPPORTED OPCODES/TMFS
    return False


def _is_read(cdb: bytes) -> bool:
    if cdb[0] in _READS:
        return True
    # GET LBA STATUS reads the medium's provisioning state.
    return cdb[0] == _SERVICE_ACTION_IN_16 and len(cdb) > 1 and cdb[1] & 0x1F == 0x12


def _through_reserve6(cdb: bytes) -> bool:
    return cdb[0] in _THROUGH_RESERVE6 or _vendor(cdb[0]) or _prevent_off(cdb)


# -- the state of one LUN ------------------------------------------------------------


def _find(rec: PrRecord, nexus: ItNexus) -> Registration | None:
    return next((r for r in rec.registrations if r.nexus == nexus), None)


def _holds(rec: PrRecord, nexus: ItNexus) -> bool:
    if rec.type is None:
        return False
    if rec.type in ALL_REGISTRANTS:
        return _find(rec, nexus) is not None
    return rec.holder == nexus


def _holder_key(rec: PrRecord) -> int:
    """The key READ RESERVATION reports: zero for the all-registrants types."""
    if rec.type in ALL_REGISTRANTS or rec.holder is None:
        return 0
    holder = _find(rec, rec.holder)
    return 0 if holder is None else holder.key


def _bump(rec: PrRecord, **changes: object) -> PrRecord:
    generation = (rec.generation + 1) & 0xFFFFFFFF
    return dataclasses.replace(rec, generation=generation, **changes)  # type: ignore[arg-type]


def _attentions(
    rec: PrRecord, nexuses: set[ItNexus], sense: tuple[int, int]
) -> list[UnitAttention]:
    """One unit attention per initiator port of ``nexuses`` (registration order)."""
    ports: list[str] = []
    for r in rec.registrations:
        if r.nexus in nexuses and r.initiator_port not in ports:
            ports.append(r.initiator_port)
    return [UnitAttention(port, *sense) for port in ports]


def _others(rec: PrRecord, nexus: ItNexus) -> set[ItNexus]:
    return {r.nexus for r in rec.registrations if r.nexus != nexus}


def _remove(
    rec: PrRecord, victims: set[ItNexus], sender: ItNexus, sense: tuple[int, int] | None
) -> tuple[PrRecord, list[UnitAttention]]:
    """Drop the registrations of ``victims`` (the reservation goes with its holder)
    and tell the victims other than the sender with ``sense``."""
    left = tuple(r for r in rec.registrations if r.nexus not in victims)
    uas = [] if sense is None else _attentions(rec, victims - {sender}, sense)
    type_, holder = rec.type, rec.holder
    if type_ in ALL_REGISTRANTS and not left:
        type_ = None  # the last holder of an all-registrants reservation is gone
    elif type_ is not None and type_ not in ALL_REGISTRANTS and holder in victims:
        type_, holder = None, None
    return dataclasses.replace(rec, registrations=left, type=type_, holder=holder), uas


@dataclass(frozen=True)
class _Out:
    """A decoded PERSISTENT RESERVE OUT command."""

    action: int
    scope: int
    type: int
    key: int
    sark: int
    aptpl: bool
    nexus: ItNexus


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
        uuid, who = lun.record.uuid, _nexus(nexus)
        with self._lock:
            rec = self._records.get(uuid)
            holder6 = self._reserve6.get(uuid)
            if cdb[0] in _RESERVE_RELEASE:
                return self._reserve_release_conflicts(rec, holder6, who, cdb[0])
            if holder6 is not None:
                # SPC-2 reservations exclude persistent ones "regardless of initiator".
                if cdb[0] in (PERSISTENT_RESERVE_IN, PERSISTENT_RESERVE_OUT):
                    return True
                return holder6 != who and not _through_reserve6(cdb)
            if rec is None or rec.type is None or _holds(rec, who):
                return False
            if rec.type in REGISTRANTS_HAVE_ACCESS and _find(rec, who) is not None:
                return False
            if _always_allowed(cdb):
                return False
            if _is_read(cdb):
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
        uuid, who = lun.record.uuid, _nexus(nexus)
        with self._lock:
            if self._reserve_release_conflicts(
                self._records.get(uuid), self._reserve6.get(uuid), who, RESERVE_6
            ):
                raise _conflict(f"LUN {lun.name} is reserved by another I_T nexus")
            self._reserve6[uuid] = who

    def release6(self, nexus: Nexus, lun: Lun) -> None:
        uuid, who = lun.record.uuid, _nexus(nexus)
        with self._lock:
            rec = self._records.get(uuid)
            if rec is not None and rec.registrations:
                raise _conflict(f"LUN {lun.name} has persistent reservation registrations")
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
        who = _nexus(nexus)
        with self._lock:
            for uuid in [u for u, holder in self._reserve6.items() if holder == who]:
                del self._reserve6[uuid]

    def forget(self, lun_uuid: str) -> None:
        """The LUN was deleted (the catalog dropped its rows by cascade)."""
        with self._lock:
            self._records.pop(lun_uuid, None)
            self._reserve6.pop(lun_uuid, None)
            self._out_locks.pop(lun_uuid, None)

    # -- PERSISTENT RESERVE IN -----------------------------------------------------

    def persistent_in(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bytes:
        """The parameter data, cut to the CDB's allocation length."""
        if len(cdb) < 10:
            raise invalid_field(0, why="PERSISTENT RESERVE IN needs a 10-byte CDB")
        action = cdb[1] & 0x1F
        allocation = int.from_bytes(cdb[7:9], "big")
        rec = self.record(lun.record.uuid)
        if action == READ_KEYS:
            data = _read_keys(rec)
        elif action == READ_RESERVATION:
            data = _read_reservation(rec)
        elif action == REPORT_CAPABILITIES:
            data = _report_capabilities(rec)
        elif action == READ_FULL_STATUS:
            data = _read_full_status(rec)
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
        out = _decode_out(nexus, cdb, bytes(params))
        uuid = lun.record.uuid
        with self._lock:
            out_lock = self._out_locks.setdefault(uuid, threading.Lock())
        with out_lock:
            rec = self.record(uuid)
            new, uas = _SERVICE_ACTIONS[out.action](rec, out)
            if new != rec:
                self._store.save(uuid, new)
                with self._lock:
                    self._records[uuid] = new
        return uas


def _decode_out(nexus: Nexus, cdb: bytes, params: bytes) -> _Out:
    if len(cdb) < 10:
        raise invalid_field(0, why="PERSISTENT RESERVE OUT needs a 10-byte CDB")
    action = cdb[1] & 0x1F
    if action not in _SERVICE_ACTIONS:
        raise invalid_field(1, 4, f"service action {action:#04x} is not supported")
    length = parameter_list_length(cdb)
    if length > BASIC_PARAMETERS and len(params) > 20 and params[20] & 0x08:
        raise invalid_param(20, 3, "SPEC_I_PT is not supported")
    if length != BASIC_PARAMETERS or len(params) < BASIC_PARAMETERS:
        raise param_length_error(
            f"the parameter list is {length} bytes ({len(params)} received), not {BASIC_PARAMETERS}"
        )
    flags = params[20]
    if flags & 0x08:
        raise invalid_param(20, 3, "SPEC_I_PT is not supported")
    if flags & 0x04 and action in (REGISTER, REGISTER_AND_IGNORE):
        raise invalid_param(20, 2, "ALL_TG_PT is not supported")
    return _Out(
        action=action,
        scope=cdb[2] >> 4,
        type=cdb[2] & 0x0F,
        key=int.from_bytes(params[0:8], "big"),
        sark=int.from_bytes(params[8:16], "big"),
        aptpl=bool(flags & 0x01),
        nexus=_nexus(nexus),
    )


def _check_scope_type(out: _Out) -> None:
    if out.scope != LU_SCOPE:
        raise invalid_field(2, 7, f"scope {out.scope} is not supported")
    if out.type not in TYPES:
        raise invalid_field(2, 3, f"reservation type {out.type} is not supported")


def _registered(rec: PrRecord, out: _Out) -> Registration:
    """The sender's registration, which must carry the command's key."""
    reg = _find(rec, out.nexus)
    if reg is None:
        raise _conflict("the I_T nexus is not registered")
    if reg.key != out.key:
        raise _conflict("the reservation key is not the one registered")
    return reg


Outcome = tuple[PrRecord, list[UnitAttention]]


def _register(rec: PrRecord, out: _Out) -> Outcome:
    return _do_register(rec, out, ignore_key=False)


def _register_and_ignore(rec: PrRecord, out: _Out) -> Outcome:
    return _do_register(rec, out, ignore_key=True)


def _do_register(rec: PrRecord, out: _Out, *, ignore_key: bool) -> Outcome:
    reg = _find(rec, out.nexus)
    if reg is None:
        if not ignore_key and out.key != 0:
            raise _conflict("an unregistered I_T nexus must give reservation key 0")
        if out.sark == 0:
            return rec, []  # unregistering what is not registered: nothing to do
        if len(rec.registrations) >= MAX_REGISTRATIONS:
            raise _no_room()
        added = Registration(out.nexus[0], out.nexus[1], out.sark)
        return _bump(rec, registrations=(*rec.registrations, added), aptpl=out.aptpl), []
    if not ignore_key and out.key != reg.key:
        raise _conflict("the reservation key is not the one registered")
    if out.sark == 0:
        released = rec.type in (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
        released = released and rec.holder == out.nexus
        new, _ = _remove(rec, {out.nexus}, out.nexus, None)
        uas = _attentions(new, _others(new, out.nexus), RESERVATIONS_RELEASED) if released else []
        return _bump(new, aptpl=out.aptpl), uas
    changed = tuple(
        dataclasses.replace(r, key=out.sark) if r.nexus == out.nexus else r
        for r in rec.registrations
    )
    return _bump(rec, registrations=changed, aptpl=out.aptpl), []


def _reserve(rec: PrRecord, out: _Out) -> Outcome:
    _check_scope_type(out)
    _registered(rec, out)
    if rec.type is None:
        holder = None if out.type in ALL_REGISTRANTS else out.nexus
        return dataclasses.replace(rec, type=out.type, holder=holder), []
    if _holds(rec, out.nexus) and rec.type == out.type:
        return rec, []
    raise _conflict("the LUN is already reserved")


def _release(rec: PrRecord, out: _Out) -> Outcome:
    _registered(rec, out)
    if rec.type is None or not _holds(rec, out.nexus):
        return rec, []
    if out.scope != LU_SCOPE or out.type != rec.type:
        raise _invalid_release()
    new = dataclasses.replace(rec, type=None, holder=None)
    if rec.type in (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS):
        return new, []
    return new, _attentions(rec, _others(rec, out.nexus), RESERVATIONS_RELEASED)


def _clear(rec: PrRecord, out: _Out) -> Outcome:
    _registered(rec, out)
    uas = _attentions(rec, _others(rec, out.nexus), RESERVATIONS_PREEMPTED)
    return _bump(rec, registrations=(), type=None, holder=None), uas


def _preempt(rec: PrRecord, out: _Out) -> Outcome:
    _registered(rec, out)
    if rec.type is None or (rec.type in ALL_REGISTRANTS and out.sark != 0):
        return _preempt_registrations(rec, out)
    _check_scope_type(out)
    if rec.type in ALL_REGISTRANTS:
        # Key zero preempts every other registrant and takes a new reservation.
        victims = _others(rec, out.nexus)
    elif out.sark == _holder_key(rec):
        victims = {r.nexus for r in rec.registrations if r.key == out.sark} - {out.nexus}
    else:
        return _preempt_registrations(rec, out)
    new, uas = _remove(rec, victims, out.nexus, REGISTRATIONS_PREEMPTED)
    holder = None if out.type in ALL_REGISTRANTS else out.nexus
    new = _bump(new, type=out.type, holder=holder)
    if out.type != rec.type:
        uas += _attentions(new, _others(new, out.nexus), RESERVATIONS_RELEASED)
    return new, uas


def _preempt_registrations(rec: PrRecord, out: _Out) -> Outcome:
    """PREEMPT of registrations only; the reservation (if any) stays."""
    if out.sark == 0:
        raise invalid_param(8, why="SERVICE ACTION RESERVATION KEY 0 preempts nothing")
    victims = {r.nexus for r in rec.registrations if r.key == out.sark}
    if not victims:
        raise _conflict("no registration has the service action reservation key")
    new, uas = _remove(rec, victims, out.nexus, REGISTRATIONS_PREEMPTED)
    return _bump(new), uas


_SERVICE_ACTIONS = {
    REGISTER: _register,
    RESERVE: _reserve,
    RELEASE: _release,
    CLEAR: _clear,
    PREEMPT: _preempt,
    # Tasks of a preempted nexus finish before the preempting command runs
    # (one ordered worker per LUN), so there is nothing left to abort.
    PREEMPT_AND_ABORT: _preempt,
    REGISTER_AND_IGNORE: _register_and_ignore,
}


# -- PERSISTENT RESERVE IN parameter data ----------------------------------------------


def _header(rec: PrRecord, body: bytes) -> bytes:
    return rec.generation.to_bytes(4, "big") + len(body).to_bytes(4, "big") + body


def _read_keys(rec: PrRecord) -> bytes:
    return _header(rec, b"".join(r.key.to_bytes(8, "big") for r in rec.registrations))


def _read_reservation(rec: PrRecord) -> bytes:
    if rec.type is None:
        return _header(rec, b"")
    body = bytearray(16)
    body[0:8] = _holder_key(rec).to_bytes(8, "big")
    body[13] = (LU_SCOPE << 4) | rec.type
    return _header(rec, bytes(body))


def _report_capabilities(rec: PrRecord) -> bytes:
    data = bytearray(8)
    data[1] = 8  # length
    data[2] = 0x01  # PTPL_C; CRH, SIP_C and ATP_C are 0
    data[3] = 0x80 | (0b001 << 4) | (0x01 if rec.aptpl else 0)  # TMV, ALLOW COMMANDS, PTPL_A
    data[4] = 0x80 | 0x40 | 0x20 | 0x08 | 0x02  # WR_EX_AR, EX_AC_RO, WR_EX_RO, EX_AC, WR_EX
    data[5] = 0x01  # EX_AC_AR
    return bytes(data)


def transport_id(initiator_port: str) -> bytes:
    """An iSCSI TransportID naming an initiator port (format 01b, SPC-4 7.6.4.6)."""
    name = initiator_port.encode() + b"\0"
    name += b"\0" * (-len(name) % 4)
    if len(name) < 20:
        name += b"\0" * (20 - len(name))
    return bytes((0x40 | _ISCSI_PROTOCOL, 0)) + len(name).to_bytes(2, "big") + name


def _read_full_status(rec: PrRecord) -> bytes:
    body = bytearray()
    for r in rec.registrations:
        tid = transport_id(r.initiator_port)
        desc = bytearray(24)
        desc[0:8] = r.key.to_bytes(8, "big")
        if _holds(rec, r.nexus) and rec.type is not None:
            desc[12] = 0x01  # R_HOLDER
            desc[13] = (LU_SCOPE << 4) | rec.type
        desc[18:20] = RELATIVE_TARGET_PORT.to_bytes(2, "big")
        desc[20:24] = len(tid).to_bytes(4, "big")
        body += desc + tid
    return _header(rec, bytes(body))
