"""Assertions on CHECK CONDITION results and their fixed-format sense data."""

from __future__ import annotations

from lunseal.frontends.scsi.interface import CHECK_CONDITION, ScsiResult


def assert_sense(
    result: ScsiResult,
    key: int,
    asc: int,
    ascq: int = 0,
    *,
    pointer: tuple[int, int | None] | None = None,
    in_cdb: bool = True,
    information: int | None = None,
) -> None:
    assert result.status == CHECK_CONDITION, result
    sense = result.sense
    assert len(sense) == 18, sense.hex()
    assert sense[0] & 0x7F == 0x70, sense.hex()
    assert sense[7] == 10, sense.hex()
    assert (sense[2], sense[12], sense[13]) == (key, asc, ascq), sense.hex()
    if pointer is not None:
        byte, bit = pointer
        flags = 0x80 | (0x40 if in_cdb else 0) | (0x08 | bit if bit is not None else 0)
        assert sense[15] == flags, sense.hex()
        assert int.from_bytes(sense[16:18], "big") == byte, sense.hex()
    if information is not None:
        assert sense[0] & 0x80, sense.hex()
        assert int.from_bytes(sense[3:7], "big") == information, sense.hex()
