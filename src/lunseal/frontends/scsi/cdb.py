"""Decoding CDB fields shared by many commands, and the request a handler gets."""

from __future__ import annotations

from dataclasses import dataclass

from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.interface import Nexus
from lunseal.frontends.scsi.sense import invalid_field, lba_out_of_range

#: Logical block size; the physical block is 2**PHYS_EXPONENT of them (4 KiB).
BLOCK = 512
PHYS_EXPONENT = 3
#: Longest READ/WRITE the target accepts, in blocks (32 MiB, the iSCSI
#: transport's limit): bounds the data-out a transport buffers for one command.
MAX_TRANSFER_BLOCKS = 65536
#: Longest COMPARE AND WRITE, in blocks.
MAX_COMPARE_WRITE_BLOCKS = 255
#: Longest WRITE SAME range (1 GiB) and UNMAP range (512 MiB), in blocks, and
#: UNMAP descriptors per command.
MAX_WRITE_SAME_BLOCKS = 1 << 21
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCRIPTORS = 256


def cdb_length(opcode: int) -> int:
    """The CDB length the operation code's group implies (SPC-4 4.2.5.1)."""
    group = opcode >> 5
    return {0: 6, 1: 10, 2: 10, 4: 16, 5: 12}.get(group, 16)


def be(cdb: bytes, start: int, end: int) -> int:
    return int.from_bytes(cdb[start:end], "big")


@dataclass(frozen=True)
class BlockRange:
    lba: int
    blocks: int

    @property
    def offset(self) -> int:
        return self.lba * BLOCK

    @property
    def length(self) -> int:
        return self.blocks * BLOCK


def block_range(cdb: bytes) -> BlockRange:
    """LBA and transfer length of a READ/WRITE-shaped CDB of any size."""
    size = cdb_length(cdb[0])
    if size == 6:
        blocks = cdb[4] or 256  # READ(6)/WRITE(6): zero means 256 blocks
        return BlockRange(be(cdb, 1, 4) & 0x1FFFFF, blocks)
    if size == 10:
        return BlockRange(be(cdb, 2, 6), be(cdb, 7, 9))
    if size == 12:
        return BlockRange(be(cdb, 2, 6), be(cdb, 6, 10))
    return BlockRange(be(cdb, 2, 10), be(cdb, 10, 14))


@dataclass
class Request:
    """One command addressed to an existing LUN, as a handler sees it."""

    cdb: bytes  # padded to 16 bytes: fields past the real CDB read as zero
    data_out: memoryview
    nexus: Nexus
    lun: Lun
    number: int
    #: The initiator's expected data transfer length (EDTL in iSCSI).
    expected_length: int = 0

    @property
    def blocks_total(self) -> int:
        return self.lun.size // BLOCK

    def write_protect(self) -> str:
        """Why this initiator may not write the LUN; empty if it may."""
        if self.lun.record.read_only:
            return f"LUN {self.lun.name} is read-only"
        if self.lun.write_guards:
            return f"LUN {self.lun.name}: {next(iter(self.lun.write_guards.values()))}"
        if self.number in self.nexus.access.read_only:
            return f"LUN {self.lun.name} is read-only for {self.nexus.initiator_name}"
        return ""

    def check_range(self, rng: BlockRange) -> None:
        if rng.lba + rng.blocks > self.blocks_total:
            raise lba_out_of_range(rng.lba, rng.blocks)

    def check_protect_field(self) -> None:
        """RDPROTECT/WRPROTECT/VRPROTECT must be zero: no protection information."""
        if self.cdb[1] & 0xE0:
            raise invalid_field(1, 7, "protection information is not supported")
