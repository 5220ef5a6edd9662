"""Fixed-format sense data (SPC-4 4.5.3) and the error that carries it.

Command code raises :class:`SenseError`; the dispatcher turns it into CHECK
CONDITION with :meth:`SenseError.sense`.  The helpers below name the
conditions this target reports, so the key/ASC/ASCQ triples live in one place.
"""

from __future__ import annotations

from dataclasses import dataclass

from lunseal.errors import LunsealError

# Sense keys (SPC-4 table 27).
NO_SENSE = 0x0
NOT_READY = 0x2
MEDIUM_ERROR = 0x3
HARDWARE_ERROR = 0x4
ILLEGAL_REQUEST = 0x5
UNIT_ATTENTION = 0x6
DATA_PROTECT = 0x7
ABORTED_COMMAND = 0xB
MISCOMPARE = 0xE

SENSE_LENGTH = 18


@dataclass(frozen=True)
class FieldPointer:
    """Where in the CDB (or the parameter list) the offending field is."""

    byte: int
    bit: int | None = None
    in_cdb: bool = True

    def encode(self) -> bytes:
        flags = 0x80 | (0x40 if self.in_cdb else 0)
        if self.bit is not None:
            flags |= 0x08 | (self.bit & 0x07)
        return bytes((flags,)) + self.byte.to_bytes(2, "big")


def fixed_sense(
    key: int,
    asc: int,
    ascq: int,
    *,
    information: int | None = None,
    pointer: FieldPointer | None = None,
) -> bytes:
    """18 bytes of current, fixed-format sense data."""
    sense = bytearray(SENSE_LENGTH)
    sense[0] = 0x70 | (0x80 if information is not None else 0)
    sense[2] = key & 0x0F
    if information is not None:
        sense[3:7] = (information & 0xFFFFFFFF).to_bytes(4, "big")
    sense[7] = SENSE_LENGTH - 8
    sense[12] = asc
    sense[13] = ascq
    if pointer is not None:
        sense[15:18] = pointer.encode()
    return bytes(sense)


class SenseError(LunsealError):
    """A command failed with CHECK CONDITION and this sense data."""

    code = "scsi_sense"

    def __init__(
        self,
        message: str,
        key: int,
        asc: int,
        ascq: int = 0,
        *,
        information: int | None = None,
        pointer: FieldPointer | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.asc = asc
        self.ascq = ascq
        self.information = information
        self.pointer = pointer

    def sense(self) -> bytes:
        return fixed_sense(
            self.key, self.asc, self.ascq, information=self.information, pointer=self.pointer
        )


def invalid_opcode(opcode: int) -> SenseError:
    return SenseError(
        f"operation code {opcode:#04x} is not supported",
        ILLEGAL_REQUEST,
        0x20,
        0x00,
        pointer=FieldPointer(0),
    )


def invalid_field(byte: int, bit: int | None = None, why: str = "") -> SenseError:
    where = f"CDB byte {byte}" + (f" bit {bit}" if bit is not None else "")
    return SenseError(
        f"invalid field in CDB ({where}){': ' + why if why else ''}",
        ILLEGAL_REQUEST,
        0x24,
        0x00,
        pointer=FieldPointer(byte, bit),
    )


def invalid_param(byte: int, bit: int | None = None, why: str = "") -> SenseError:
    return SenseError(
        f"invalid field in parameter list (byte {byte}){': ' + why if why else ''}",
        ILLEGAL_REQUEST,
        0x26,
        0x00,
        pointer=FieldPointer(byte, bit, in_cdb=False),
    )


def param_length_error(why: str = "") -> SenseError:
    return SenseError(
        f"parameter list length error{': ' + why if why else ''}", ILLEGAL_REQUEST, 0x1A, 0x00
    )


def short_data_out(wanted: int, got: int) -> SenseError:
    # INVALID FIELD IN COMMAND INFORMATION UNIT: the transport's expected length
    # and the CDB disagree.
    return SenseError(
        f"the CDB asks for {wanted} bytes of data, the initiator sends {got}",
        ILLEGAL_REQUEST,
        0x0E,
        0x03,
    )


def lba_out_of_range(lba: int, blocks: int) -> SenseError:
    return SenseError(
        f"LBA {lba}+{blocks} is beyond the end of the medium", ILLEGAL_REQUEST, 0x21, 0x00
    )


def write_protected(why: str) -> SenseError:
    return SenseError(why, DATA_PROTECT, 0x27, 0x00)


def lun_not_supported(number: int) -> SenseError:
    return SenseError(f"LUN {number} is not supported", ILLEGAL_REQUEST, 0x25, 0x00)


def miscompare(offset: int) -> SenseError:
    """MISCOMPARE DURING VERIFY OPERATION; ``offset``: first differing byte."""
    return SenseError(f"miscompare at byte {offset}", MISCOMPARE, 0x1D, 0x00, information=offset)


def not_ready(why: str) -> SenseError:
    # LOGICAL UNIT NOT READY, CAUSE NOT REPORTABLE: the backing file cannot serve.
    return SenseError(why, NOT_READY, 0x04, 0x00)


def medium_error(why: str, *, write: bool) -> SenseError:
    # WRITE ERROR / UNRECOVERED READ ERROR.
    return SenseError(why, MEDIUM_ERROR, 0x0C if write else 0x11, 0x00)


def hardware_error(why: str) -> SenseError:
    # INTERNAL TARGET FAILURE.
    return SenseError(why, HARDWARE_ERROR, 0x44, 0x00)
