"""Persistent reservations and RESERVE/RELEASE(6) on a real array and catalog.

Every service action, type and conflict rule of SPC-4 5.13 the array offers;
the state through clean restarts, crashes (APTPL) and LUN deletion.
"""

from __future__ import annotations

import sqlite3
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.errors import CatalogError
from lunseal.frontends.scsi import reservations as pr
from lunseal.frontends.scsi.interface import Nexus
from lunseal.frontends.scsi.reservations import (
    ReservationConflict,
    Reservations,
    UnitAttention,
)
from lunseal.frontends.scsi.sense import SenseError
from tests.support.arrays import Arrays

MiB = 1 << 20
TARGET_PORT = "iqn.2026-12.test:lunseal.t,t,0x0001"
WE, EA, WE_RO, EA_RO, WE_AR, EA_AR = 1, 3, 5, 6, 7, 8
ALL_TYPES = (WE, EA, WE_RO, EA_RO, WE_AR, EA_AR)


def nexus(host: str, isid: str = "0x23d000000001") -> Nexus:
    name = f"iqn.2026-12.test:{host}"
    return Nexus(name, f"{name},i,{isid}", TARGET_PORT)


A, B, C = nexus("a"), nexus("b"), nexus("c")


def prout_cdb(action: int, type_: int = 0, scope: int = 0, length: int = 24) -> bytes:
    return bytes((0x5F, action, (scope << 4) | type_, 0, 0)) + struct.pack(">IB", length, 0)


def params(key: int = 0, sark: int = 0, *, aptpl: bool = False, flags: int = 0) -> bytes:
    return struct.pack(">QQ4sB3x", key, sark, b"", flags | int(aptpl))


def prin_cdb(action: int, allocation: int = 8192) -> bytes:
    return bytes((0x5E, action, 0, 0, 0, 0, 0)) + struct.pack(">HB", allocation, 0)


@dataclass
class Env:
    arrays: Arrays
    array: Array
    res: Reservations

    @property
    def lun(self) -> Lun:
        return self.array.lun("disk")

    def out(
        self,
        who: Nexus,
        action: int,
        key: int = 0,
        sark: int = 0,
        *,
        type_: int = 0,
        aptpl: bool = False,
        scope: int = 0,
    ) -> list[UnitAttention]:
        cdb = prout_cdb(action, type_, scope)
        return self.res.persistent_out(who, self.lun, cdb, params(key, sark, aptpl=aptpl))

    def register(self, who: Nexus, key: int, *, aptpl: bool = False) -> None:
        assert self.out(who, pr.REGISTER_AND_IGNORE, sark=key, aptpl=aptpl) == []

    def reserve(self, who: Nexus, key: int, type_: int) -> None:
        assert self.out(who, pr.RESERVE, key, type_=type_) == []

    def prin(self, action: int, allocation: int = 8192, who: Nexus = A) -> bytes:
        return self.res.persistent_in(who, self.lun, prin_cdb(action, allocation))

    def keys(self) -> tuple[int, list[int]]:
        data = self.prin(pr.READ_KEYS)
        generation, length = struct.unpack(">II", data[:8])
        assert length == len(data) - 8
        return generation, [k for (k,) in struct.iter_unpack(">Q", data[8:])]

    def reservation(self) -> tuple[int, int] | None:
        """(key, type) of the reservation, or None."""
        data = self.prin(pr.READ_RESERVATION)
        if struct.unpack(">I", data[4:8])[0] == 0:
            assert len(data) == 8
            return None
        assert len(data) == 24
        assert data[21] >> 4 == 0
        return struct.unpack(">Q", data[8:16])[0], data[21] & 0x0F

    def conflicts(self, who: Nexus, cdb: bytes) -> bool:
        return self.res.conflict(who, self.lun, cdb)

    def restart(self, *, crash: bool = False) -> None:
        self.array = self.arrays.crash() if crash else self.arrays.restart()
        self.res = Reservations.for_array(self.array)


@pytest.fixture
def env(tmp_path: Path) -> Iterator[Env]:
    arrays = Arrays(tmp_path / "data")
    array = arrays.open()
    array.create_lun("disk", 16 * MiB, number=0)
    try:
        yield Env(arrays, array, Reservations.for_array(array))
    finally:
        arrays.close()


def sense_of(exc: pytest.ExceptionInfo[SenseError]) -> tuple[int, int, int]:
    return exc.value.key, exc.value.asc, exc.value.ascq


# -- REGISTER / REGISTER AND IGNORE EXISTING KEY -----------------------------------------


def test_register_lists_the_key_and_counts_the_generation(env: Env) -> None:
    assert env.keys() == (0, [])
    assert env.out(A, pr.REGISTER, 0, 0x1111) == []
    assert env.keys() == (1, [0x1111])
    env.register(B, 0x2222)
    assert env.keys() == (2, [0x1111, 0x2222])
    # Changing one's key with the right old key; unregistering with key 0 as new key.
    env.out(A, pr.REGISTER, 0x1111, 0x3333)
    assert env.keys() == (3, [0x3333, 0x2222])
    env.out(A, pr.REGISTER, 0x3333, 0)
    assert env.keys() == (4, [0x2222])


def test_register_with_the_wrong_key_conflicts_and_changes_nothing(env: Env) -> None:
    env.register(A, 0x1111)
    # libiscsi ProutRegister: a registered nexus re-registering with key 0 conflicts.
    with pytest.raises(ReservationConflict):
        env.out(A, pr.REGISTER, 0, 0x1112)
    with pytest.raises(ReservationConflict):
        env.out(A, pr.REGISTER, 0x9999, 0x1112)
    # An unregistered nexus must give reservation key 0.
    with pytest.raises(ReservationConflict):
        env.out(B, pr.REGISTER, 0x1111, 0x2222)
    assert env.keys() == (1, [0x1111])


def test_register_and_ignore_replaces_whatever_key_was_registered(env: Env) -> None:
    env.register(A, 0x1111)
    assert env.out(A, pr.REGISTER_AND_IGNORE, 0xDEAD, 0x2222) == []
    assert env.keys() == (2, [0x2222])
    env.out(A, pr.REGISTER_AND_IGNORE, 0, 0)
    assert env.keys() == (3, [])


def test_unregistering_what_is_not_registered_does_nothing(env: Env) -> None:
    env.out(A, pr.REGISTER, 0, 0)
    env.out(A, pr.REGISTER_AND_IGNORE, 0, 0)
    assert env.keys() == (0, [])


def test_one_initiator_through_two_sessions_is_two_registrations(env: Env) -> None:
    env.register(A, 0x1111)
    env.register(nexus("a", "0x23d000000002"), 0x1111)
    assert env.keys() == (2, [0x1111, 0x1111])


def test_registrations_are_bounded_per_lun(env: Env) -> None:
    for i in range(pr.MAX_REGISTRATIONS):
        env.register(nexus("many", f"0x{i:012x}"), i + 1)
    with pytest.raises(SenseError) as exc:
        env.register(B, 0x2222)
    assert sense_of(exc) == (0x5, 0x55, 0x04)  # INSUFFICIENT REGISTRATION RESOURCES
    assert len(env.keys()[1]) == pr.MAX_REGISTRATIONS


def test_keys_use_all_64_bits(env: Env) -> None:
    high = 0xFFFF_FFFF_FFFF_FFFE
    env.register(A, high)
    env.reserve(A, high, WE)
    env.restart()
    assert env.keys() == (1, [high])
    assert env.reservation() == (high, WE)


# -- RESERVE / RELEASE -----------------------------------------------------------------


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_reserve_and_release_every_type(env: Env, type_: int) -> None:
    env.register(A, 0xA)
    env.reserve(A, 0xA, type_)
    # All-registrants reservations report key 0: every registrant holds them.
    assert env.reservation() == (0 if type_ in (WE_AR, EA_AR) else 0xA, type_)
    env.reserve(A, 0xA, type_)  # the holder reserving again with the same type is a no-op
    assert env.out(A, pr.RELEASE, 0xA, type_=type_) == []
    assert env.reservation() is None
    assert env.keys() == (1, [0xA])  # RESERVE and RELEASE leave the generation alone


def test_reserve_needs_the_callers_registration_and_key(env: Env) -> None:
    env.register(A, 0xA)
    with pytest.raises(ReservationConflict):
        env.reserve(B, 0, WE)
    with pytest.raises(ReservationConflict):
        env.reserve(A, 0xB, WE)
    assert env.reservation() is None


def test_reserve_over_another_reservation_conflicts(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, WE)
    with pytest.raises(ReservationConflict):
        env.reserve(B, 0xB, WE)
    with pytest.raises(ReservationConflict):
        env.reserve(A, 0xA, EA)  # the holder cannot change the type by RESERVE
    assert env.reservation() == (0xA, WE)


def test_reserve_refuses_unknown_types_and_scopes(env: Env) -> None:
    env.register(A, 0xA)
    for type_ in (0, 2, 4, 9, 15):
        with pytest.raises(SenseError) as exc:
            env.reserve(A, 0xA, type_)
        assert sense_of(exc) == (0x5, 0x24, 0x00)
        assert exc.value.pointer is not None
        assert exc.value.pointer.byte == 2
    with pytest.raises(SenseError) as exc:
        env.out(A, pr.RESERVE, 0xA, type_=WE, scope=1)
    assert sense_of(exc) == (0x5, 0x24, 0x00)
    assert env.reservation() is None


def test_release_by_a_non_holder_does_nothing(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, EA)
    assert env.out(B, pr.RELEASE, 0xB, type_=EA) == []
    assert env.reservation() == (0xA, EA)
    with pytest.raises(ReservationConflict):  # but it must still be registered
        env.out(C, pr.RELEASE, 0, type_=EA)


def test_release_with_another_type_is_an_invalid_release(env: Env) -> None:
    env.register(A, 0xA)
    env.reserve(A, 0xA, EA)
    with pytest.raises(SenseError) as exc:
        env.out(A, pr.RELEASE, 0xA, type_=WE)
    assert sense_of(exc) == (0x5, 0x26, 0x04)
    assert env.reservation() == (0xA, EA)


@pytest.mark.parametrize("type_", [WE_RO, EA_RO, WE_AR, EA_AR])
def test_releasing_a_shared_reservation_tells_the_other_registrants(env: Env, type_: int) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.register(C, 0xC)
    env.reserve(A, 0xA, type_)
    uas = env.out(A, pr.RELEASE, 0xA, type_=type_)
    assert uas == [
        UnitAttention(B.initiator_port, 0x2A, 0x04),
        UnitAttention(C.initiator_port, 0x2A, 0x04),
    ]


@pytest.mark.parametrize("type_", [WE, EA])
def test_releasing_an_exclusive_reservation_tells_nobody(env: Env, type_: int) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, type_)
    assert env.out(A, pr.RELEASE, 0xA, type_=type_) == []


# -- ownership: the holder unregisters (libiscsi ProutReserve.Ownership*) -------------------


@pytest.mark.parametrize("type_", [WE, EA, WE_RO, EA_RO])
def test_the_reservation_goes_with_its_holders_registration(env: Env, type_: int) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, type_)
    uas = env.out(A, pr.REGISTER, 0xA, 0)
    assert env.reservation() is None
    # Registrants-only reservations tell the remaining registrants (SPC-4 5.13.10.3).
    released = [UnitAttention(B.initiator_port, 0x2A, 0x04)]
    assert uas == (released if type_ in (WE_RO, EA_RO) else [])
    assert not env.conflicts(B, bytes(10) + b"\x2a")  # anything goes again


@pytest.mark.parametrize("type_", [WE_AR, EA_AR])
def test_an_all_registrants_reservation_lasts_while_anyone_is_registered(
    env: Env, type_: int
) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, type_)
    env.out(A, pr.REGISTER, 0xA, 0)
    assert env.reservation() == (0, type_)
    assert env.out(B, pr.RELEASE, 0xB, type_=type_) == []
    assert env.reservation() is None
    env.reserve(B, 0xB, type_)
    env.out(B, pr.REGISTER, 0xB, 0)  # the last registrant leaves
    assert env.reservation() is None


# -- conflicts: which commands go through each type ----------------------------------------

READ10 = bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0))
WRITE10 = bytes((0x2A, 0, 0, 0, 0, 1, 0, 0, 1, 0))
TUR = bytes(6)
INQUIRY = bytes((0x12, 0, 0, 0, 0xFF, 0))
MODE_SENSE6 = bytes((0x1A, 0, 0x3F, 0, 0xFF, 0))
SYNC_CACHE10 = bytes((0x35,)) + bytes(9)
READ_CAPACITY10 = bytes((0x25,)) + bytes(9)
READ_CAPACITY16 = bytes((0x9E, 0x10)) + bytes(14)
GET_LBA_STATUS = bytes((0x9E, 0x12)) + bytes(14)
UNMAP = bytes((0x42,)) + bytes(9)
COMPARE_AND_WRITE = bytes((0x89,)) + bytes(15)
PREVENT = bytes((0x1E, 0, 0, 0, 1, 0))
ALLOW = bytes((0x1E, 0, 0, 0, 0, 0))
REPORT_LUNS = bytes((0xA0,)) + bytes(11)
VENDOR = bytes((0xC0,)) + bytes(15)
PRIN = prin_cdb(pr.READ_KEYS)
PROUT = prout_cdb(pr.REGISTER)

NEVER = [TUR, INQUIRY, READ_CAPACITY10, READ_CAPACITY16, ALLOW, REPORT_LUNS, VENDOR, PRIN, PROUT]
READS = [READ10, GET_LBA_STATUS]
OTHERS = [WRITE10, MODE_SENSE6, SYNC_CACHE10, UNMAP, COMPARE_AND_WRITE, PREVENT]


@pytest.mark.parametrize("type_", ALL_TYPES)
def test_what_each_kind_of_nexus_may_do_through_each_type(env: Env, type_: int) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, type_)
    exclusive = type_ in (EA, EA_RO, EA_AR)
    registrants_in = type_ in (WE_RO, EA_RO, WE_AR, EA_AR)
    for cdb in NEVER + READS + OTHERS:
        assert not env.conflicts(A, cdb), cdb.hex()  # the holder
        # A registered non-holder gets the holder's access only under the
        # registrants-only and all-registrants types; otherwise what C gets.
        expected = cdb not in NEVER and (cdb in OTHERS or exclusive)
        assert env.conflicts(B, cdb) == (expected and not registrants_in), cdb.hex()
        assert env.conflicts(C, cdb) == expected, cdb.hex()


def test_without_a_reservation_registrations_alone_block_nothing(env: Env) -> None:
    env.register(A, 0xA)
    for cdb in NEVER + READS + OTHERS:
        assert not env.conflicts(B, cdb)


def test_a_reservation_binds_only_its_own_lun(env: Env) -> None:
    other = env.array.create_lun("other", MiB, number=1)
    env.register(A, 0xA)
    env.reserve(A, 0xA, EA)
    assert env.conflicts(B, WRITE10)
    assert not env.res.conflict(B, other, WRITE10)
    assert env.res.persistent_in(B, other, prin_cdb(pr.READ_KEYS))[:8] == bytes(8)


# -- CLEAR -----------------------------------------------------------------------------


def test_clear_removes_everything_and_tells_the_others(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.register(nexus("b", "0x23d000000009"), 0xB)  # B's second session: one more port
    env.reserve(A, 0xA, EA)
    uas = env.out(A, pr.CLEAR, 0xA)
    assert env.reservation() is None
    assert env.keys() == (4, [])
    assert [(u.asc, u.ascq) for u in uas] == [(0x2A, 0x03)] * 2
    second = f"{B.initiator_name},i,0x23d000000009"
    assert {u.initiator_port for u in uas} == {B.initiator_port, second}


def test_clear_needs_a_registered_key(env: Env) -> None:
    env.register(A, 0xA)
    with pytest.raises(ReservationConflict):
        env.out(B, pr.CLEAR, 0)
    with pytest.raises(ReservationConflict):
        env.out(A, pr.CLEAR, 0xB)
    assert env.keys() == (1, [0xA])


# -- PREEMPT / PREEMPT AND ABORT ------------------------------------------------------------


@pytest.mark.parametrize("action", [pr.PREEMPT, pr.PREEMPT_AND_ABORT])
def test_preempt_without_a_reservation_removes_registrations(env: Env, action: int) -> None:
    # libiscsi ProutPreempt.RemoveRegistration.
    env.register(A, 0xA)
    env.register(B, 0xB)
    generation = env.keys()[0]
    uas = env.out(B, action, 0xB, 0xA, type_=EA)
    assert uas == [UnitAttention(A.initiator_port, 0x2A, 0x05)]
    assert env.keys() == (generation + 1, [0xB])
    assert env.reservation() is None  # no reservation was taken


@pytest.mark.parametrize("action", [pr.PREEMPT, pr.PREEMPT_AND_ABORT])
def test_preempting_the_holder_takes_over_its_reservation(env: Env, action: int) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.register(C, 0xC)
    env.reserve(A, 0xA, WE)
    uas = env.out(B, action, 0xB, 0xA, type_=EA)
    assert env.reservation() == (0xB, EA)
    assert env.keys() == (4, [0xB, 0xC])
    # A lost its registration; C, still registered, sees the type change.
    assert uas == [
        UnitAttention(A.initiator_port, 0x2A, 0x05),
        UnitAttention(C.initiator_port, 0x2A, 0x04),
    ]
    assert env.conflicts(A, READ10)


def test_the_holder_may_preempt_itself_to_change_the_type(env: Env) -> None:
    env.register(A, 0xA)
    env.reserve(A, 0xA, WE)
    assert env.out(A, pr.PREEMPT, 0xA, 0xA, type_=EA) == []
    assert env.reservation() == (0xA, EA)
    assert env.keys() == (2, [0xA])


def test_preempting_a_non_holder_leaves_the_reservation(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.register(C, 0xC)
    env.reserve(A, 0xA, WE_RO)
    uas = env.out(B, pr.PREEMPT, 0xB, 0xC, type_=EA)
    assert uas == [UnitAttention(C.initiator_port, 0x2A, 0x05)]
    assert env.reservation() == (0xA, WE_RO)
    assert env.keys()[1] == [0xA, 0xB]


def test_preempt_with_key_zero_takes_over_an_all_registrants_reservation(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.register(C, 0xC)
    env.reserve(A, 0xA, WE_AR)
    uas = env.out(B, pr.PREEMPT, 0xB, 0, type_=EA)
    assert env.reservation() == (0xB, EA)
    assert env.keys()[1] == [0xB]
    assert uas == [
        UnitAttention(A.initiator_port, 0x2A, 0x05),
        UnitAttention(C.initiator_port, 0x2A, 0x05),
    ]


def test_preempt_errors(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    with pytest.raises(SenseError) as exc:  # key 0 names nobody without such a reservation
        env.out(B, pr.PREEMPT, 0xB, 0, type_=EA)
    assert sense_of(exc) == (0x5, 0x26, 0x00)
    with pytest.raises(ReservationConflict):  # nobody has that key
        env.out(B, pr.PREEMPT, 0xB, 0x77, type_=EA)
    with pytest.raises(ReservationConflict):  # the sender must be registered
        env.out(C, pr.PREEMPT, 0, 0xA, type_=EA)
    env.reserve(A, 0xA, WE)
    with pytest.raises(SenseError) as exc:  # taking a reservation needs a valid type
        env.out(B, pr.PREEMPT, 0xB, 0xA, type_=2)
    assert sense_of(exc) == (0x5, 0x24, 0x00)
    assert env.keys() == (2, [0xA, 0xB])
    assert env.reservation() == (0xA, WE)


# -- REGISTER AND MOVE ------------------------------------------------------------------


def move_params(
    key: int, sark: int, to: str, *, unreg: bool = False, port: int = 1, tid: bytes | None = None
) -> bytes:
    tid = pr.transport_id(to) if tid is None else tid
    head = struct.pack(">QQxBHI", key, sark, 0x02 if unreg else 0, port, len(tid))
    return head + tid


def move(env: Env, who: Nexus, data: bytes, type_: int = WE) -> list[UnitAttention]:
    cdb = prout_cdb(pr.REGISTER_AND_MOVE, type_, length=len(data))
    return env.res.persistent_out(who, env.lun, cdb, data)


@pytest.mark.parametrize("unreg", [False, True])
def test_register_and_move_hands_the_reservation_over(env: Env, unreg: bool) -> None:
    env.register(A, 0xA)
    env.reserve(A, 0xA, WE)
    assert move(env, A, move_params(0xA, 0xB, B.initiator_port, unreg=unreg)) == []
    assert env.reservation() == (0xB, WE)
    assert env.keys() == (2, [0xB] if unreg else [0xA, 0xB])
    assert not env.conflicts(B, WRITE10)
    assert env.conflicts(A, WRITE10)


def test_transport_ids_name_initiator_ports() -> None:
    port = "iqn.2026-12.test:x,i,0x23d000000001"
    tid = pr.transport_id(port)
    assert len(tid) % 4 == 0
    assert pr.parse_transport_id(tid) == port
    shouted = tid.replace(b",i,0x23d", b",I,0X23D")
    assert pr.parse_transport_id(shouted) == port
    with pytest.raises(SenseError):
        pr.parse_transport_id(bytes((0x05,)) + tid[1:])  # format 00b: a device, not a port
    with pytest.raises(SenseError):
        pr.parse_transport_id(bytes((0x41,)) + tid[1:])  # not iSCSI
    with pytest.raises(SenseError):
        pr.parse_transport_id(pr.transport_id("iqn.2026-12.test:x"))  # no ISID


def test_register_and_move_errors(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    with pytest.raises(ReservationConflict):  # nothing to move
        move(env, A, move_params(0xA, 0xC, C.initiator_port))
    env.reserve(A, 0xA, WE)
    with pytest.raises(ReservationConflict):  # not the holder
        move(env, B, move_params(0xB, 0xC, C.initiator_port))
    with pytest.raises(ReservationConflict):  # wrong key
        move(env, A, move_params(0xB, 0xC, C.initiator_port))
    invalid_params = [
        move_params(0xA, 0, C.initiator_port),  # no key for the destination
        move_params(0xA, 0xC, A.initiator_port),  # to itself
        move_params(0xA, 0xC, C.initiator_port, port=2),  # no such target port
    ]
    for data in invalid_params:
        with pytest.raises(SenseError) as exc:
            move(env, A, data)
        assert sense_of(exc) == (0x5, 0x26, 0x00)
    good = move_params(0xA, 0xC, C.initiator_port)
    for data in (good[:30], good[:24] + bytes(4)):  # cut short / a TransportID too long
        cdb = prout_cdb(pr.REGISTER_AND_MOVE, WE, length=len(good))
        with pytest.raises(SenseError) as exc:
            env.res.persistent_out(A, env.lun, cdb, data)
        assert sense_of(exc) == (0x5, 0x1A, 0x00)
    env.out(A, pr.PREEMPT, 0xA, 0xA, type_=WE_AR)
    with pytest.raises(ReservationConflict):  # all-registrants reservations have no one holder
        move(env, A, move_params(0xA, 0xC, C.initiator_port), WE_AR)
    assert env.keys()[1] == [0xA, 0xB]


# -- malformed commands ---------------------------------------------------------------------


@pytest.mark.parametrize("length", [0, 8, 23, 25, 4096])
def test_parameter_list_length_must_be_24(env: Env, length: int) -> None:
    cdb = prout_cdb(pr.REGISTER_AND_IGNORE, length=length)
    data = (params(0, 0x1111) + bytes(length))[:length]
    with pytest.raises(SenseError) as exc:
        env.res.persistent_out(A, env.lun, cdb, data)
    assert sense_of(exc) == (0x5, 0x1A, 0x00)
    assert env.keys() == (0, [])


def test_a_short_data_out_is_a_parameter_list_length_error(env: Env) -> None:
    with pytest.raises(SenseError) as exc:
        env.res.persistent_out(A, env.lun, prout_cdb(pr.REGISTER), params(0, 1)[:20])
    assert sense_of(exc) == (0x5, 0x1A, 0x00)


def test_data_out_length_is_bounded() -> None:
    assert pr.data_out_length(prout_cdb(pr.REGISTER)) == 24
    assert pr.data_out_length(prout_cdb(pr.REGISTER, length=1 << 31)) == pr.MAX_PARAMETERS
    assert pr.MAX_PARAMETERS < 512


@pytest.mark.parametrize(("flags", "bit"), [(0x08, 3), (0x04, 2)])
def test_spec_i_pt_and_all_tg_pt_are_refused(env: Env, flags: int, bit: int) -> None:
    cdb = prout_cdb(pr.REGISTER)
    with pytest.raises(SenseError) as exc:
        env.res.persistent_out(A, env.lun, cdb, params(0, 0x1111, flags=flags))
    assert sense_of(exc) == (0x5, 0x26, 0x00)
    assert exc.value.pointer is not None
    assert (exc.value.pointer.byte, exc.value.pointer.bit, exc.value.pointer.in_cdb) == (
        20,
        bit,
        False,
    )
    assert env.keys() == (0, [])


@pytest.mark.parametrize("action", [0x08, 0x1F])
def test_unknown_service_actions_out(env: Env, action: int) -> None:
    with pytest.raises(SenseError) as exc:
        env.res.persistent_out(A, env.lun, prout_cdb(action), params(0, 1))
    assert sense_of(exc) == (0x5, 0x24, 0x00)
    assert exc.value.pointer is not None
    assert exc.value.pointer.byte == 1


@pytest.mark.parametrize("action", range(4, 0x20))
def test_unknown_service_actions_in(env: Env, action: int) -> None:
    # libiscsi PrinServiceactionRange.
    with pytest.raises(SenseError) as exc:
        env.prin(action)
    assert sense_of(exc) == (0x5, 0x24, 0x00)


def test_short_cdbs_are_invalid(env: Env) -> None:
    with pytest.raises(SenseError):
        env.res.persistent_in(A, env.lun, prin_cdb(0)[:6])
    with pytest.raises(SenseError):
        env.res.persistent_out(A, env.lun, prout_cdb(0)[:6], params())


# -- PERSISTENT RESERVE IN data ----------------------------------------------------------


def test_read_keys_is_cut_to_the_allocation_length(env: Env) -> None:
    # libiscsi PrinReadKeys.Truncate: the ADDITIONAL LENGTH stays whole.
    env.register(A, 0xA)
    env.register(B, 0xB)
    data = env.prin(pr.READ_KEYS, allocation=8)
    assert data == struct.pack(">II", 2, 16)
    assert env.prin(pr.READ_KEYS, allocation=12) == struct.pack(">IIQ", 2, 16, 0xA)[:12]
    assert env.prin(pr.READ_KEYS, allocation=0) == b""


def test_report_capabilities(env: Env) -> None:
    data = env.prin(pr.REPORT_CAPABILITIES)
    assert len(data) == 8
    assert struct.unpack(">H", data[:2])[0] == 8
    assert data[2] == 0x01  # PTPL_C only: no CRH, SIP_C, ATP_C
    assert data[3] & 0x80
    assert (data[3] >> 4) & 0x07 == 1
    assert data[3] & 0x01 == 0  # PTPL_A: nobody asked for APTPL
    assert data[4:6] == b"\xea\x01"  # the six types
    env.register(A, 0xA, aptpl=True)
    assert env.prin(pr.REPORT_CAPABILITIES)[3] & 0x01


def test_read_full_status_describes_every_registration(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, WE_RO)
    data = env.prin(pr.READ_FULL_STATUS)
    generation, length = struct.unpack(">II", data[:8])
    assert (generation, length) == (2, len(data) - 8)
    seen = []
    pos = 8
    while pos < len(data):
        key = struct.unpack(">Q", data[pos : pos + 8])[0]
        holder, scope_type = data[pos + 12] & 0x01, data[pos + 13]
        port_id, tid_len = struct.unpack(">HI", data[pos + 18 : pos + 24])
        tid = data[pos + 24 : pos + 24 + tid_len]
        assert port_id == pr.RELATIVE_TARGET_PORT
        assert tid[0] == 0x45
        assert tid_len % 4 == 0
        assert tid_len >= 24
        assert struct.unpack(">H", tid[2:4])[0] == tid_len - 4
        name = tid[4:].rstrip(b"\0").decode()
        seen.append((key, holder, scope_type, name))
        pos += 24 + tid_len
    assert seen == [(0xA, 1, WE_RO, A.initiator_port), (0xB, 0, 0, B.initiator_port)]


# -- RESERVE(6) / RELEASE(6) -----------------------------------------------------------


def test_reserve6_belongs_to_one_nexus(env: Env) -> None:
    # libiscsi Reserve6.2Initiators.
    env.res.reserve6(A, env.lun)
    env.res.reserve6(A, env.lun)  # again, by the holder
    with pytest.raises(ReservationConflict):
        env.res.reserve6(B, env.lun)
    assert env.conflicts(B, bytes((0x16,)) + bytes(5))
    assert not env.conflicts(B, bytes((0x17,)) + bytes(5))
    env.res.release6(B, env.lun)  # a no-op for a non-holder
    for cdb in (MODE_SENSE6, READ10, WRITE10, TUR):
        assert env.conflicts(B, cdb), cdb.hex()
        assert not env.conflicts(A, cdb), cdb.hex()
    for cdb in (INQUIRY, REPORT_LUNS, ALLOW, VENDOR):
        assert not env.conflicts(B, cdb), cdb.hex()
    env.res.release6(A, env.lun)
    env.res.reserve6(B, env.lun)
    assert env.conflicts(A, WRITE10)


@pytest.mark.parametrize("how", ["lun reset", "target reset", "logout"])
def test_reserve6_ends_with_a_reset_or_the_holders_session(env: Env, how: str) -> None:
    env.res.reserve6(A, env.lun)
    if how == "lun reset":
        env.res.reset_lun(env.lun)
    elif how == "target reset":
        env.res.reset_target()
    else:
        env.res.nexus_gone(B)  # somebody else leaving changes nothing
        assert env.conflicts(B, WRITE10)
        env.res.nexus_gone(A)
    assert not env.conflicts(B, WRITE10)
    env.res.reserve6(B, env.lun)


def test_reserve6_and_persistent_reservations_exclude_each_other(env: Env) -> None:
    env.res.reserve6(A, env.lun)
    for who in (A, B):  # SPC-2 reservations block PR commands of everybody
        assert env.conflicts(who, PRIN)
        assert env.conflicts(who, PROUT)
    env.res.release6(A, env.lun)
    env.register(B, 0xB)
    # REPORT CAPABILITIES says CRH=0: with anybody registered, RESERVE and RELEASE conflict.
    for who in (A, B):
        with pytest.raises(ReservationConflict):
            env.res.reserve6(who, env.lun)
        with pytest.raises(ReservationConflict):
            env.res.release6(who, env.lun)
        assert env.conflicts(who, bytes((0x16,)) + bytes(5))


def test_reserve6_does_not_survive_a_restart(env: Env) -> None:
    env.res.reserve6(A, env.lun)
    env.restart()
    assert not env.conflicts(B, WRITE10)


# -- persistence --------------------------------------------------------------------------


def test_registrations_and_reservations_survive_a_clean_restart(env: Env) -> None:
    env.register(A, 0xA)
    env.register(B, 0xB)
    env.reserve(A, 0xA, EA)
    before = env.prin(pr.READ_FULL_STATUS)
    env.restart()
    assert env.prin(pr.READ_FULL_STATUS) == before
    assert env.conflicts(B, READ10)
    assert not env.conflicts(A, WRITE10)
    env.out(B, pr.REGISTER, 0xB, 0)
    assert env.keys() == (3, [0xA])  # the generation continues


def test_a_crash_keeps_what_asked_for_aptpl_and_drops_the_rest(env: Env) -> None:
    other = env.array.create_lun("other", MiB, number=1)
    env.register(A, 0xA, aptpl=True)
    env.reserve(A, 0xA, EA)
    env.res.persistent_out(B, other, prout_cdb(pr.REGISTER_AND_IGNORE), params(0, 0xB))
    env.restart(crash=True)
    assert env.keys() == (1, [0xA])
    assert env.reservation() == (0xA, EA)
    other = env.array.lun("other")
    assert env.res.persistent_in(A, other, prin_cdb(pr.READ_KEYS)) == bytes(8)


def test_the_last_registration_decides_aptpl(env: Env) -> None:
    env.register(A, 0xA, aptpl=True)
    env.register(B, 0xB, aptpl=False)
    env.restart(crash=True)
    assert env.keys() == (0, [])


def test_deleting_the_lun_drops_its_reservations(env: Env) -> None:
    env.register(A, 0xA, aptpl=True)
    env.reserve(A, 0xA, WE)
    env.array.delete_lun("disk", force=True)
    db = sqlite3.connect(env.array.catalog.path)
    try:
        for table in ("scsi_pr_registrations", "scsi_pr_state"):
            assert db.execute(f"SELECT count(*) FROM {table}").fetchone() == (0,)
    finally:
        db.close()
    env.array.create_lun("disk", MiB, number=0)
    assert env.keys() == (0, [])
    assert env.reservation() is None


def test_a_catalog_failure_changes_nothing(env: Env) -> None:
    env.register(A, 0xA)
    db = sqlite3.connect(env.array.catalog.path)
    # The array's connection fails on the update as on a full disk: an
    # operational error in the middle of the transaction.
    db.execute(
        "CREATE TRIGGER full BEFORE UPDATE ON scsi_pr_state BEGIN SELECT disk_is_full(); END"
    )
    db.commit()
    try:
        with pytest.raises(CatalogError):
            env.register(B, 0xB)
        assert env.keys() == (1, [0xA])
        assert not env.conflicts(B, WRITE10)
    finally:
        db.execute("DROP TRIGGER full")
        db.commit()
        db.close()
    env.restart()
    assert env.keys() == (1, [0xA])
