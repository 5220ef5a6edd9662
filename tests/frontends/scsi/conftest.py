"""A real array in a temp dir with a SCSI target in front of it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.interface import GOOD, LunAccess, Nexus, ScsiCommand, ScsiResult
from lunseal.frontends.scsi.target import ScsiTarget
from tests.support.arrays import Arrays

MiB = 1 << 20
TARGET = "iqn.2026-12.test:lunseal.t"


def nexus(
    name: str = "iqn.2026-12.test:host1",
    isid: str = "0x23d000000001",
    access: LunAccess | None = None,
) -> Nexus:
    return Nexus(name, f"{name},i,{isid}", f"{TARGET},t,0x0001", access or LunAccess())


@dataclass
class Scsi:
    """Runs commands the way a transport would: on the LUN's worker."""

    array: Array
    target: ScsiTarget
    nexus: Nexus = field(default_factory=nexus)

    @property
    def disk(self) -> Lun:
        return self.array.lun("disk")

    def run(
        self,
        cdb: bytes,
        data_out: bytes = b"",
        *,
        lun: int = 0,
        nexus: Nexus | None = None,
        expected: int = 1 << 24,
    ) -> ScsiResult:
        who = nexus or self.nexus
        cmd = ScsiCommand(lun, cdb, who, data_out, expected)
        found = self.target.lun(who, lun)
        if found is None:
            return self.target.execute(cmd)
        return found.run(lambda: self.target.execute(cmd))

    def good(self, cdb: bytes, data_out: bytes = b"", **kw: object) -> bytes:
        result = self.run(cdb, data_out, **kw)  # type: ignore[arg-type]
        assert result.status == GOOD, (result.status, result.sense.hex())
        data = result.data
        if not isinstance(data, bytes | bytearray | memoryview):
            data = self.disk.read(data.offset, data.length)  # a FileSlice of the LUN
        return bytes(data)

    def attach(self, who: Nexus | None = None, lun: int = 0) -> None:
        """Consume the power-on unit attention a new nexus gets first."""
        result = self.run(bytes(6), lun=lun, nexus=who)
        assert result.sense[12:14] == b"\x29\x00", result.sense.hex()


@pytest.fixture
def scsi(tmp_path: Path) -> Iterator[Scsi]:
    arrays = Arrays(tmp_path / "data")
    array = arrays.open()
    array.create_lun("disk", 16 * MiB, number=0)
    try:
        s = Scsi(array, ScsiTarget(array))
        s.attach()
        yield s
    finally:
        arrays.close()
