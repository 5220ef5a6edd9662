"""The per-LUN entry point: checks, the change gate, stats, grow and validation."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from lunseal.engine.backends.base import Extent
from lunseal.engine.backends.memory import MemoryBackend
from lunseal.engine.lun import (
    MAX_LUN_NUMBER,
    MAX_LUN_SIZE,
    NAME_MAX,
    Lun,
    LunRecord,
    validate_name,
    validate_number,
    validate_size,
)
from lunseal.errors import InvalidArgument, NoSpace, OutOfRange, ReadOnly

SIZE = 64 * 1024
Event = tuple[object, ...]


class RecordingBackend(MemoryBackend):
    """A real in-memory backend that also logs every call into a shared journal."""

    def __init__(self, size: int, journal: list[Event]) -> None:
        super().__init__(size)
        self.journal = journal

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.journal.append(("backend.write", offset, len(data)))
        super().write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self.journal.append(("backend.trim", offset, length))
        super().trim(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self.journal.append(("backend.zero", offset, length))
        super().zero(offset, length, may_trim=may_trim, fast_only=fast_only)

    def resize(self, size: int) -> None:
        self.journal.append(("backend.resize", size))
        super().resize(size)

    def flush(self) -> None:
        self.journal.append(("backend.flush",))


def make_lun(
    journal: list[Event] | None = None, *, size: int = SIZE, read_only: bool = False
) -> Lun:
    journal = [] if journal is None else journal
    record = LunRecord(
        uuid="00000000-0000-4000-8000-000000000000",
        name="test",
        number=0,
        size=size,
        backend="memory",
        path="",
        owned=True,
        read_only=read_only,
        created_at=0.0,
    )
    lun = Lun(record, RecordingBackend(size, journal))
    lun.listeners.append(lambda _lun, offset, length: journal.append(("listener", offset, length)))
    return lun


@pytest.fixture
def journal() -> list[Event]:
    return []


@pytest.fixture
def lun(journal: list[Event]) -> Lun:
    return make_lun(journal)


# -- the change gate ---------------------------------------------------------------------

CHANGES = ["write", "trim", "zero"]


def change(lun: Lun, op: str, offset: int = 4096, length: int = 100, *, fua: bool = False) -> None:
    """Make a data-changing call of kind ``op``."""
    if op == "write":
        lun.write(offset, b"x" * length, fua=fua)
    elif op == "trim":
        lun.trim(offset, length, fua=fua)
    else:
        lun.zero(offset, length, fua=fua)


@pytest.mark.parametrize("op", CHANGES)
def test_listener_runs_before_the_backend_is_touched(
    lun: Lun, journal: list[Event], op: str
) -> None:
    change(lun, op)
    assert journal == [("listener", 4096, 100), (f"backend.{op}", 4096, 100)]


@pytest.mark.parametrize("op", CHANGES)
def test_a_failing_listener_keeps_the_backend_untouched(
    lun: Lun, journal: list[Event], op: str
) -> None:
    lun.write(4096, b"y" * 100)
    journal.clear()

    def refuse(_lun: Lun, _offset: int, _length: int) -> None:
        raise RuntimeError("cannot record the change")

    lun.listeners.insert(0, refuse)
    with pytest.raises(RuntimeError):
        change(lun, op)
    assert journal == []
    assert lun.read(4096, 100) == b"y" * 100


def test_every_listener_sees_the_change(lun: Lun) -> None:
    seen: list[tuple[str, int, int]] = []
    lun.listeners.append(lambda changed, off, n: seen.append((changed.name, off, n)))
    lun.write(7, b"abc")
    assert seen == [("test", 7, 3)]


def test_grow_passes_the_gate_with_the_new_tail(lun: Lun, journal: list[Event]) -> None:
    lun.grow(2 * SIZE)
    assert journal == [("listener", SIZE, SIZE), ("backend.resize", 2 * SIZE)]


@pytest.mark.parametrize(
    "call",
    [
        lambda lun: lun.read(0, 100),
        lambda lun: lun.read_slice(0, 100),
        lambda lun: lun.flush(),
        lambda lun: lun.cache(0, SIZE),
        lambda lun: lun.extents(0, SIZE),
    ],
    ids=["read", "read_slice", "flush", "cache", "extents"],
)
def test_non_changing_operations_never_call_listeners(
    lun: Lun, journal: list[Event], call: Callable[[Lun], object]
) -> None:
    call(lun)
    assert not [e for e in journal if e[0] == "listener"]


@pytest.mark.parametrize("op", CHANGES)
def test_fua_flushes_after_the_change(lun: Lun, journal: list[Event], op: str) -> None:
    change(lun, op, 0, 1, fua=True)
    assert journal[-1] == ("backend.flush",)
    assert journal[-2][0] == f"backend.{op}"


# -- range checks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("offset", "length"), [(SIZE, 1), (SIZE - 1, 2), (-1, 1), (0, -1)])
def test_reads_beyond_the_end_are_out_of_range(lun: Lun, offset: int, length: int) -> None:
    with pytest.raises(OutOfRange):
        lun.read(offset, length)
    with pytest.raises(OutOfRange):
        lun.read_slice(offset, length)
    with pytest.raises(OutOfRange):
        lun.extents(offset, length)
    with pytest.raises(OutOfRange):
        lun.cache(offset, length)


def test_reads_up_to_the_end_are_fine(lun: Lun) -> None:
    assert lun.read(SIZE - 1, 1) == b"\0"
    assert lun.read(SIZE, 0) == b""
    assert lun.extents(0, SIZE) == [Extent(0, SIZE, hole=True, zero=True)]


@pytest.mark.parametrize("op", CHANGES)
@pytest.mark.parametrize(("offset", "length"), [(SIZE, 1), (SIZE - 50, 100), (-1, 1)])
def test_changes_beyond_the_end_are_no_space_and_not_recorded(
    journal: list[Event], op: str, offset: int, length: int
) -> None:
    lun = make_lun(journal)
    with pytest.raises(NoSpace) as info:
        change(lun, op, offset, length)
    assert not isinstance(info.value, OutOfRange)
    assert journal == []


def test_write_up_to_the_last_byte_is_accepted(lun: Lun) -> None:
    lun.write(SIZE - 3, b"end")
    assert lun.read(SIZE - 3, 3) == b"end"


# -- read-only ---------------------------------------------------------------------------------


@pytest.mark.parametrize("op", CHANGES)
def test_read_only_refuses_changes_before_the_gate(journal: list[Event], op: str) -> None:
    lun = make_lun(journal, read_only=True)
    with pytest.raises(ReadOnly):
        change(lun, op)
    assert journal == []
    assert lun.stats.writes == lun.stats.trims == lun.stats.zeroes == 0


def test_read_only_still_reads_and_flushes(journal: list[Event]) -> None:
    lun = make_lun(journal, read_only=True)
    assert lun.read(0, 10) == bytes(10)
    lun.flush()
    assert journal == [("backend.flush",)]


# -- grow ------------------------------------------------------------------------------------


def test_grow_makes_the_tail_readable_as_zeroes(lun: Lun) -> None:
    lun.write(SIZE - 4, b"tail")
    lun.grow(SIZE + 512)
    assert lun.size == SIZE + 512
    assert lun.backend.size == SIZE + 512
    assert lun.read(SIZE - 4, 516) == b"tail" + bytes(512)


@pytest.mark.parametrize("new_size", [SIZE, SIZE - 512, SIZE + 1, SIZE + 1000, 0, -512])
def test_grow_refuses_anything_but_a_larger_multiple_of_512(
    lun: Lun, journal: list[Event], new_size: int
) -> None:
    with pytest.raises(InvalidArgument):
        lun.grow(new_size)
    assert lun.size == SIZE
    assert journal == []


def test_grow_refuses_more_than_the_maximum(lun: Lun) -> None:
    with pytest.raises(InvalidArgument, match="maximum"):
        lun.grow(MAX_LUN_SIZE + 512)


# -- stats -------------------------------------------------------------------------------------


def test_stats_count_operations_and_bytes(lun: Lun) -> None:
    lun.write(0, b"a" * 1000)
    lun.write(1000, b"b" * 24)
    lun.read(0, 512)
    assert lun.read_slice(0, 100) == b"a" * 100
    lun.trim(0, 512)
    lun.zero(512, 512)
    lun.zero(1024, 512)
    lun.flush()
    s = lun.stats
    assert (s.writes, s.bytes_written) == (2, 1024)
    assert (s.reads, s.bytes_read) == (2, 612)
    assert (s.trims, s.zeroes, s.flushes) == (1, 2, 1)


def test_refused_operations_are_not_counted(lun: Lun) -> None:
    with pytest.raises(NoSpace):
        lun.write(SIZE, b"x")
    with pytest.raises(OutOfRange):
        lun.read(SIZE, 1)
    assert lun.stats.writes == lun.stats.reads == lun.stats.bytes_written == 0


# -- users -------------------------------------------------------------------------------------


class User:
    def __init__(self) -> None:
        self.reasons: list[str] = []

    def revoke(self, reason: str) -> None:
        self.reasons.append(reason)


def test_revoke_users_tells_every_user_and_forgets_them(lun: Lun) -> None:
    users = [User(), User()]
    lun.users.update(users)
    lun.revoke_users("going away")
    assert [u.reasons for u in users] == [["going away"], ["going away"]]
    assert lun.users == set()


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["a", "demo", "LUN0", "9", "db-01", "x.y_z", "a..b", "a" * NAME_MAX, "trailing-"]
)
def test_valid_names(name: str) -> None:
    assert validate_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".hidden",
        "-rf",
        "_x",
        ".",
        "..",
        "../x",
        "a/b",
        "/abs",
        "a\\b",
        "a\0b",
        "a b",
        " a",
        "a\n",
        "demo\n",
        "a\t",
        "é",
        "lun:1",
        "a?b",
        "a%2Fb",
        "a" * (NAME_MAX + 1),
    ],
)
def test_invalid_names(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid LUN name"):
        validate_name(name)


@pytest.mark.parametrize("size", [512, 4096, 1 << 30, MAX_LUN_SIZE])
def test_valid_sizes(size: int) -> None:
    assert validate_size(size) == size


@pytest.mark.parametrize("size", [0, -512, 1, 511, 513, 1000, MAX_LUN_SIZE + 512])
def test_invalid_sizes(size: int) -> None:
    with pytest.raises(InvalidArgument, match="invalid size"):
        validate_size(size)


@pytest.mark.parametrize("number", [0, 1, MAX_LUN_NUMBER])
def test_valid_numbers(number: int) -> None:
    assert validate_number(number) == number


@pytest.mark.parametrize("number", [-1, MAX_LUN_NUMBER + 1])
def test_invalid_numbers(number: int) -> None:
    with pytest.raises(InvalidArgument, match="invalid LUN number"):
        validate_number(number)


def test_record_with_changes_returns_a_new_record(lun: Lun) -> None:
    changed = lun.record.with_changes(read_only=True)
    assert changed.read_only
    assert not lun.record.read_only
    assert changed.uuid == lun.record.uuid
