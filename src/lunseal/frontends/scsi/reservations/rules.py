"""Which commands a reservation lets through, and the helpers that read and
change one LUN's :class:`~lunseal.engine.pr_store.PrRecord`."""

from __future__ import annotations

import dataclasses

from lunseal.engine.pr_store import ItNexus, PrRecord, Registration
from lunseal.frontends.scsi.interface import Nexus
from lunseal.frontends.scsi.reservations.spc import (
    ALL_REGISTRANTS,
    PERSISTENT_RESERVE_IN,
    PERSISTENT_RESERVE_OUT,
    RELEASE_6,
    RELEASE_10,
    RESERVE_6,
    RESERVE_10,
    UnitAttention,
)


def it_nexus(nexus: Nexus) -> ItNexus:
    return (nexus.initiator_port, nexus.target_port)


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
RESERVE_RELEASE = frozenset({RESERVE_6, RELEASE_6, RESERVE_10, RELEASE_10})
#: While a RESERVE(6) reservation is held, other I_T nexuses may still send these.
_THROUGH_RESERVE6 = frozenset({0x03, 0x12, 0xA0, RELEASE_6, RELEASE_10})


def vendor(opcode: int) -> bool:
    # The array's in-band state commands read or hold tokens, never data:
    # a backup host must be able to use them whoever holds the LUN.
    return opcode >= 0xC0


def prevent_off(cdb: bytes) -> bool:
    return cdb[0] == _PREVENT_ALLOW and len(cdb) > 4 and cdb[4] & 0x03 == 0


def always_allowed(cdb: bytes) -> bool:
    op = cdb[0]
    if op in _ALWAYS or vendor(op) or prevent_off(cdb):
        return True
    sa = cdb[1] & 0x1F if len(cdb) > 1 else 0
    if op == _SERVICE_ACTION_IN_16:
        return sa == 0x10  # READ CAPACITY(16)
    if op == _MAINTENANCE_IN:
        return sa in (0x05, 0x0C, 0x0D)  # REPORT TARGET PORT GROUPS, SUPPORTED OPCODES/TMFS
    return False


def is_read(cdb: bytes) -> bool:
    if cdb[0] in _READS:
        return True
    # GET LBA STATUS reads the medium's provisioning state.
    return cdb[0] == _SERVICE_ACTION_IN_16 and len(cdb) > 1 and cdb[1] & 0x1F == 0x12


def through_reserve6(cdb: bytes) -> bool:
    return cdb[0] in _THROUGH_RESERVE6 or vendor(cdb[0]) or prevent_off(cdb)


# -- the state of one LUN ------------------------------------------------------------


def find(rec: PrRecord, nexus: ItNexus) -> Registration | None:
    return next((r for r in rec.registrations if r.nexus == nexus), None)


def holds(rec: PrRecord, nexus: ItNexus) -> bool:
    if rec.type is None:
        return False
    if rec.type in ALL_REGISTRANTS:
        return find(rec, nexus) is not None
    return rec.holder == nexus


def holder_key(rec: PrRecord) -> int:
    """The key READ RESERVATION reports: zero for the all-registrants types."""
    if rec.type in ALL_REGISTRANTS or rec.holder is None:
        return 0
    holder = find(rec, rec.holder)
    return 0 if holder is None else holder.key


def bump(rec: PrRecord, **changes: object) -> PrRecord:
    generation = (rec.generation + 1) & 0xFFFFFFFF
    return dataclasses.replace(rec, generation=generation, **changes)  # type: ignore[arg-type]


def attentions(rec: PrRecord, nexuses: set[ItNexus], sense: tuple[int, int]) -> list[UnitAttention]:
    """One unit attention per initiator port of ``nexuses`` (registration order)."""
    ports: list[str] = []
    for r in rec.registrations:
        if r.nexus in nexuses and r.initiator_port not in ports:
            ports.append(r.initiator_port)
    return [UnitAttention(port, *sense) for port in ports]


def others(rec: PrRecord, nexus: ItNexus) -> set[ItNexus]:
    return {r.nexus for r in rec.registrations if r.nexus != nexus}


def remove(
    rec: PrRecord, victims: set[ItNexus], sender: ItNexus, sense: tuple[int, int] | None
) -> tuple[PrRecord, list[UnitAttention]]:
    """Drop the registrations of ``victims`` (the reservation goes with its holder)
    and tell the victims other than the sender with ``sense``."""
    left = tuple(r for r in rec.registrations if r.nexus not in victims)
    uas = [] if sense is None else attentions(rec, victims - {sender}, sense)
    type_, holder = rec.type, rec.holder
    if type_ in ALL_REGISTRANTS and not left:
        type_ = None  # the last holder of an all-registrants reservation is gone
    elif type_ is not None and type_ not in ALL_REGISTRANTS and holder in victims:
        type_, holder = None, None
    return dataclasses.replace(rec, registrations=left, type=type_, holder=holder), uas
