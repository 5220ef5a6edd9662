"""Codes, limits and errors of SCSI reservations (SPC-4 5.13, 6.15, 6.16)."""

from __future__ import annotations

from dataclasses import dataclass

from lunseal.errors import LunsealError
from lunseal.frontends.scsi.sense import ILLEGAL_REQUEST, SenseError

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
#: The longest TransportID REGISTER AND MOVE accepts: an iSCSI name (at most
#: 223 bytes), ",i,0x", an ISID and padding, with its 4-byte header.
MAX_TRANSPORT_ID = 260
#: The longest parameter list the target accepts (it buffers no more).
MAX_PARAMETERS = BASIC_PARAMETERS + MAX_TRANSPORT_ID
#: Registrations one LUN keeps; more gets INSUFFICIENT REGISTRATION RESOURCES.
MAX_REGISTRATIONS = 256
#: The one target port of the array, as READ FULL STATUS reports it.
RELATIVE_TARGET_PORT = 1

# Additional sense codes of unit attentions (ASC 2Ah).
RESERVATIONS_PREEMPTED = (0x2A, 0x03)
RESERVATIONS_RELEASED = (0x2A, 0x04)
REGISTRATIONS_PREEMPTED = (0x2A, 0x05)

# SCSI protocol identifier of iSCSI, for TransportIDs (SPC-4 table 444).
ISCSI_PROTOCOL = 0x5


class ReservationConflict(LunsealError):
    """The command is refused with status RESERVATION CONFLICT (no sense data)."""

    code = "reservation_conflict"


@dataclass(frozen=True)
class UnitAttention:
    """A unit attention the target must queue for one initiator port of the LUN."""

    initiator_port: str
    asc: int
    ascq: int


def conflict_error(why: str) -> ReservationConflict:
    return ReservationConflict(why)


def invalid_release() -> SenseError:
    return SenseError(
        "RELEASE names another scope or type than the reservation's",
        ILLEGAL_REQUEST,
        0x26,
        0x04,
    )


def no_room() -> SenseError:
    return SenseError(
        f"the LUN already has {MAX_REGISTRATIONS} registrations",
        ILLEGAL_REQUEST,
        0x55,
        0x04,
    )
