"""Commands about the unit rather than its blocks: TEST UNIT READY, START STOP
UNIT, PREVENT ALLOW MEDIUM REMOVAL, READ DEFECT DATA."""

from __future__ import annotations

from lunseal.frontends.scsi.cdb import Request, be
from lunseal.frontends.scsi.interface import ScsiResult
from lunseal.frontends.scsi.sense import invalid_field


def test_unit_ready(req: Request) -> ScsiResult:
    return ScsiResult()


def start_stop_unit(req: Request) -> ScsiResult:
    """A LUN is always started and its medium cannot be ejected; a stop that
    may flush (NO_FLUSH clear) makes written data durable, as a disk would."""
    byte4 = req.cdb[4]
    if byte4 & 0x02 and not byte4 & 0x01:
        raise invalid_field(4, 1, "the medium is not removable")
    if not byte4 & 0x05:
        req.lun.flush()
    return ScsiResult()


def prevent_allow(req: Request) -> ScsiResult:
    # The medium is not removable: preventing its removal is trivially true.
    return ScsiResult()


def read_defect_data10(req: Request) -> ScsiResult:
    data = bytes((0, req.cdb[2] & 0x1F, 0, 0))
    return ScsiResult(data=data[: be(req.cdb, 7, 9)])


def read_defect_data12(req: Request) -> ScsiResult:
    data = bytes((0, req.cdb[1] & 0x1F, 0, 0, 0, 0, 0, 0))
    return ScsiResult(data=data[: be(req.cdb, 6, 10)])
