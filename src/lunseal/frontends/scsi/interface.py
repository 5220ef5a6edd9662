"""What a transport hands the SCSI layer, and what it gets back.

The contract between a SCSI transport (``frontends/iscsi``) and the command
set (``frontends/scsi``):

* The transport resolves the LUN number with :meth:`ScsiTarget.lun` and runs
  :meth:`ScsiTarget.execute` on that LUN's worker (``Lun.worker``; inline when
  it has none).  Commands addressed to no LUN (REPORT LUNS, INQUIRY of an
  absent LUN) run wherever the transport is, since they touch no LUN data.
* Before asking the initiator for data-out, the transport learns from
  :meth:`ScsiTarget.data_out_length` how many bytes the CDB itself asks for, so
  it can compute residuals (RFC 7143 11.4.5) and never buffer more than that.
* ``execute`` never raises for a SCSI-level error: it returns CHECK CONDITION
  with sense data.  Anything else that escapes is a bug; the transport answers
  it with CHECK CONDITION / HARDWARE ERROR and logs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lunseal.engine.backends.base import FileSlice

# SAM-5 status codes.
GOOD = 0x00
CHECK_CONDITION = 0x02
CONDITION_MET = 0x04
BUSY = 0x08
RESERVATION_CONFLICT = 0x18
TASK_SET_FULL = 0x28
TASK_ABORTED = 0x40


@dataclass(frozen=True)
class LunAccess:
    """What one initiator may do with the LUNs it sees (LUN masking)."""

    #: LUN numbers the initiator sees; ``None``: every LUN of the array.
    visible: frozenset[int] | None = None
    #: LUN numbers it may only read (reported write-protected to it).
    read_only: frozenset[int] = frozenset()

    def sees(self, number: int) -> bool:
        return self.visible is None or number in self.visible


@dataclass(frozen=True)
class Nexus:
    """An I_T nexus: which initiator port sends a command, through which target port.

    ``initiator_port`` is the SCSI initiator port name (for iSCSI: the
    initiator's IQN, ``",i,0x"`` and the session's ISID in hex), the identity
    persistent reservations and unit attentions are kept for.
    """

    initiator_name: str
    initiator_port: str
    target_port: str
    access: LunAccess = field(default_factory=LunAccess)
    #: Where the initiator connects from (HOST:PORT), for the audit trail.
    address: str = ""


@dataclass
class ScsiCommand:
    lun: int
    cdb: bytes
    nexus: Nexus
    #: The data-out the initiator sent (at most :meth:`ScsiTarget.data_out_length`).
    data_out: bytes | bytearray | memoryview = b""
    #: The initiator's expected data transfer length (bounds the data-in).
    expected_length: int = 0


@dataclass
class ScsiResult:
    status: int = GOOD
    #: Data-in: at most ``expected_length`` bytes are sent, the rest is a residual.
    data: bytes | bytearray | memoryview | FileSlice = b""
    #: Fixed-format sense data (SPC-4 4.5.3) for CHECK CONDITION, else empty.
    sense: bytes = b""
