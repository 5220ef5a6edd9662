"""PERSISTENT RESERVE OUT: decoding the command and carrying out each service
action on a LUN's record (pure functions: old record in, new record and unit
attentions out; the caller saves the record)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from lunseal.engine.pr_store import ItNexus, PrRecord, Registration
from lunseal.frontends.scsi.interface import Nexus
from lunseal.frontends.scsi.reservations.data import parse_transport_id
from lunseal.frontends.scsi.reservations.rules import (
    attentions,
    bump,
    find,
    holder_key,
    holds,
    it_nexus,
    others,
    remove,
)
from lunseal.frontends.scsi.reservations.spc import (
    ALL_REGISTRANTS,
    BASIC_PARAMETERS,
    CLEAR,
    EXCLUSIVE_ACCESS,
    EXCLUSIVE_ACCESS_REGISTRANTS_ONLY,
    LU_SCOPE,
    MAX_PARAMETERS,
    MAX_REGISTRATIONS,
    PREEMPT,
    PREEMPT_AND_ABORT,
    REGISTER,
    REGISTER_AND_IGNORE,
    REGISTER_AND_MOVE,
    REGISTRATIONS_PREEMPTED,
    RELATIVE_TARGET_PORT,
    RELEASE,
    RESERVATIONS_PREEMPTED,
    RESERVATIONS_RELEASED,
    RESERVE,
    TYPES,
    WRITE_EXCLUSIVE,
    WRITE_EXCLUSIVE_REGISTRANTS_ONLY,
    UnitAttention,
    conflict_error,
    invalid_release,
    no_room,
)
from lunseal.frontends.scsi.sense import invalid_field, invalid_param, param_length_error


def parameter_list_length(cdb: bytes) -> int:
    """The PARAMETER LIST LENGTH of a PERSISTENT RESERVE OUT CDB (bytes 5-8)."""
    return int.from_bytes(cdb[5:9], "big") if len(cdb) >= 9 else 0


def data_out_length(cdb: bytes) -> int:
    """How much data-out to take for a PERSISTENT RESERVE OUT: the parameter
    list, but never more than :data:`MAX_PARAMETERS` (a longer list is refused
    with PARAMETER LIST LENGTH ERROR all the same, without buffering it)."""
    return min(parameter_list_length(cdb), MAX_PARAMETERS)


@dataclass(frozen=True)
class OutCommand:
    """A decoded PERSISTENT RESERVE OUT command."""

    action: int
    scope: int
    type: int
    key: int
    sark: int
    aptpl: bool
    nexus: ItNexus
    #: REGISTER AND MOVE: where the reservation goes, and whether the sender
    #: then unregisters.
    destination: ItNexus | None = None
    unregister: bool = False


def decode_out(nexus: Nexus, cdb: bytes, params: bytes) -> OutCommand:
    if len(cdb) < 10:
        raise invalid_field(0, why="PERSISTENT RESERVE OUT needs a 10-byte CDB")
    action = cdb[1] & 0x1F
    if action not in SERVICE_ACTIONS:
        raise invalid_field(1, 4, f"service action {action:#04x} is not supported")
    length = parameter_list_length(cdb)
    if action == REGISTER_AND_MOVE:
        return decode_move(nexus, cdb, params, length)
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
    return OutCommand(
        action=action,
        scope=cdb[2] >> 4,
        type=cdb[2] & 0x0F,
        key=int.from_bytes(params[0:8], "big"),
        sark=int.from_bytes(params[8:16], "big"),
        aptpl=bool(flags & 0x01),
        nexus=it_nexus(nexus),
    )


def decode_move(nexus: Nexus, cdb: bytes, params: bytes, length: int) -> OutCommand:
    """The parameter list of REGISTER AND MOVE (SPC-4 6.16.4): the basic 24 bytes
    with a relative target port and a TransportID naming the destination."""
    if length < BASIC_PARAMETERS or length > MAX_PARAMETERS or len(params) < length:
        raise param_length_error(f"a REGISTER AND MOVE parameter list of {length} bytes")
    tid_length = int.from_bytes(params[20:24], "big")
    if BASIC_PARAMETERS + tid_length > length:
        raise param_length_error(f"a TransportID of {tid_length} bytes does not fit")
    if int.from_bytes(params[18:20], "big") != RELATIVE_TARGET_PORT:
        raise invalid_param(18, why="the array has one target port, number 1")
    destination = (parse_transport_id(params[24 : 24 + tid_length]), nexus.target_port)
    return OutCommand(
        action=REGISTER_AND_MOVE,
        scope=cdb[2] >> 4,
        type=cdb[2] & 0x0F,
        key=int.from_bytes(params[0:8], "big"),
        sark=int.from_bytes(params[8:16], "big"),
        aptpl=bool(params[17] & 0x01),
        nexus=it_nexus(nexus),
        destination=destination,
        unregister=bool(params[17] & 0x02),
    )


def check_scope_type(out: OutCommand) -> None:
    if out.scope != LU_SCOPE:
        raise invalid_field(2, 7, f"scope {out.scope} is not supported")
    if out.type not in TYPES:
        raise invalid_field(2, 3, f"reservation type {out.type} is not supported")


def registered(rec: PrRecord, out: OutCommand) -> Registration:
    """The sender's registration, which must carry the command's key."""
    reg = find(rec, out.nexus)
    if reg is None:
        raise conflict_error("the I_T nexus is not registered")
    if reg.key != out.key:
        raise conflict_error("the reservation key is not the one registered")
    return reg


Outcome = tuple[PrRecord, list[UnitAttention]]


def _register(rec: PrRecord, out: OutCommand) -> Outcome:
    return _do_register(rec, out, ignore_key=False)


def _register_and_ignore(rec: PrRecord, out: OutCommand) -> Outcome:
    return _do_register(rec, out, ignore_key=True)


def _do_register(rec: PrRecord, out: OutCommand, *, ignore_key: bool) -> Outcome:
    reg = find(rec, out.nexus)
    if reg is None:
        if not ignore_key and out.key != 0:
            raise conflict_error("an unregistered I_T nexus must give reservation key 0")
        if out.sark == 0:
            return rec, []  # unregistering what is not registered: nothing to do
        if len(rec.registrations) >= MAX_REGISTRATIONS:
            raise no_room()
        added = Registration(out.nexus[0], out.nexus[1], out.sark)
        return bump(rec, registrations=(*rec.registrations, added), aptpl=out.aptpl), []
    if not ignore_key and out.key != reg.key:
        raise conflict_error("the reservation key is not the one registered")
    if out.sark == 0:
        released = rec.type in (WRITE_EXCLUSIVE_REGISTRANTS_ONLY, EXCLUSIVE_ACCESS_REGISTRANTS_ONLY)
        released = released and rec.holder == out.nexus
        new, _ = remove(rec, {out.nexus}, out.nexus, None)
        uas = attentions(new, others(new, out.nexus), RESERVATIONS_RELEASED) if released else []
        return bump(new, aptpl=out.aptpl), uas
    changed = tuple(
        dataclasses.replace(r, key=out.sark) if r.nexus == out.nexus else r
        for r in rec.registrations
    )
    return bump(rec, registrations=changed, aptpl=out.aptpl), []


def _reserve(rec: PrRecord, out: OutCommand) -> Outcome:
    check_scope_type(out)
    registered(rec, out)
    if rec.type is None:
        holder = None if out.type in ALL_REGISTRANTS else out.nexus
        return dataclasses.replace(rec, type=out.type, holder=holder), []
    if holds(rec, out.nexus) and rec.type == out.type:
        return rec, []
    raise conflict_error("the LUN is already reserved")


def _release(rec: PrRecord, out: OutCommand) -> Outcome:
    registered(rec, out)
    if rec.type is None or not holds(rec, out.nexus):
        return rec, []
    if out.scope != LU_SCOPE or out.type != rec.type:
        raise invalid_release()
    new = dataclasses.replace(rec, type=None, holder=None)
    if rec.type in (WRITE_EXCLUSIVE, EXCLUSIVE_ACCESS):
        return new, []
    return new, attentions(rec, others(rec, out.nexus), RESERVATIONS_RELEASED)


def _clear(rec: PrRecord, out: OutCommand) -> Outcome:
    registered(rec, out)
    uas = attentions(rec, others(rec, out.nexus), RESERVATIONS_PREEMPTED)
    return bump(rec, registrations=(), type=None, holder=None), uas


def _preempt(rec: PrRecord, out: OutCommand) -> Outcome:
    registered(rec, out)
    if rec.type is None or (rec.type in ALL_REGISTRANTS and out.sark != 0):
        return _preempt_registrations(rec, out)
    check_scope_type(out)
    if rec.type in ALL_REGISTRANTS:
        # Key zero preempts every other registrant and takes a new reservation.
        victims = others(rec, out.nexus)
    elif out.sark == holder_key(rec):
        victims = {r.nexus for r in rec.registrations if r.key == out.sark} - {out.nexus}
    else:
        return _preempt_registrations(rec, out)
    new, uas = remove(rec, victims, out.nexus, REGISTRATIONS_PREEMPTED)
    holder = None if out.type in ALL_REGISTRANTS else out.nexus
    new = bump(new, type=out.type, holder=holder)
    if out.type != rec.type:
        uas += attentions(new, others(new, out.nexus), RESERVATIONS_RELEASED)
    return new, uas


def _preempt_registrations(rec: PrRecord, out: OutCommand) -> Outcome:
    """PREEMPT of registrations only; the reservation (if any) stays."""
    if out.sark == 0:
        raise invalid_param(8, why="SERVICE ACTION RESERVATION KEY 0 preempts nothing")
    victims = {r.nexus for r in rec.registrations if r.key == out.sark}
    if not victims:
        raise conflict_error("no registration has the service action reservation key")
    new, uas = remove(rec, victims, out.nexus, REGISTRATIONS_PREEMPTED)
    return bump(new), uas


def _register_and_move(rec: PrRecord, out: OutCommand) -> Outcome:
    """Hand the sender's reservation to another I_T nexus, registering it."""
    check_scope_type(out)
    registered(rec, out)
    if out.sark == 0:
        raise invalid_param(8, why="the destination needs a non-zero reservation key")
    if rec.type is None or not holds(rec, out.nexus) or rec.type in ALL_REGISTRANTS:
        raise conflict_error("only the holder of a single-holder reservation can move it")
    destination = out.destination
    assert destination is not None  # decoded with the service action
    if destination == out.nexus:
        raise invalid_param(24, why="the destination is the I_T nexus sending the command")
    regs = [r for r in rec.registrations if r.nexus != destination]
    if len(regs) == len(rec.registrations) and len(regs) >= MAX_REGISTRATIONS:
        raise no_room()
    regs.append(Registration(destination[0], destination[1], out.sark))
    if out.unregister:
        regs = [r for r in regs if r.nexus != out.nexus]
    return bump(rec, registrations=tuple(regs), holder=destination, aptpl=out.aptpl), []


SERVICE_ACTIONS = {
    REGISTER: _register,
    RESERVE: _reserve,
    RELEASE: _release,
    CLEAR: _clear,
    PREEMPT: _preempt,
    # Commands of a preempted nexus that reached the LUN's ordered worker first
    # have run already, and later ones are checked against the new state, so
    # nothing is left to abort: the unit attention is what the host sees.
    PREEMPT_AND_ABORT: _preempt,
    REGISTER_AND_IGNORE: _register_and_ignore,
    REGISTER_AND_MOVE: _register_and_move,
}
