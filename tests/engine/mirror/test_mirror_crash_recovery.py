"""Mirrors after a simulated crash: the write-intent log loses no mark, copies resume.

A crash is simulated by abandoning the :class:`Array` as ``kill -9`` would:
descriptors and the catalog connection are closed without a flush, a
checkpoint or a clean-shutdown record.  Data already handed to ``pwrite`` is in
the page cache and survives, as it does when only the process dies; what a
crash loses is everything the array kept in memory (the exact region maps).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.layers import MirroredBackend
from lunseal.engine.lun import Lun
from lunseal.engine.mirror.mirror import (
    GRANULARITY,
    INTENT_REGION,
    RESTORING,
    RESYNCING,
    SOURCE,
    SPLIT,
    SYNCED,
    SYNCING,
    TARGET,
    Mirror,
)
from lunseal.errors import ReadOnly
from tests.support.arrays import Arrays

KiB = 1 << 10
MiB = 1 << 20
SIZE = 4 * INTENT_REGION  # 64 MiB: four intent regions, so the log's coarseness shows
PER_INTENT = INTENT_REGION // GRANULARITY


class Crash(Exception):
    """Stands for the process dying at the point where it is raised."""


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


@pytest.fixture
def array(arrays: Arrays) -> Array:
    return arrays.open()


def data(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def drive(array: Array, budget: int = 2 * MiB, limit: int = 10_000) -> None:
    for _ in range(limit):
        if not array.mirrors.busy():
            return
        array.mirrors.copy_step(budget)
    raise AssertionError("the copy did not finish")


def assert_identical(a: Lun, b: Lun) -> None:
    for off in range(0, a.size, 4 * MiB):
        n = min(4 * MiB, a.size - off)
        assert a.backend.read(off, n) == b.backend.read(off, n), f"{a.name} != {b.name} at {off}"


def regions(writes: Iterable[tuple[int, int]]) -> set[int]:
    found: set[int] = set()
    for off, n in writes:
        found.update(range(off // GRANULARITY, (off + n - 1) // GRANULARITY + 1))
    return found


def intent_regions(*indexes: int) -> set[int]:
    return {r for i in indexes for r in range(i * PER_INTENT, (i + 1) * PER_INTENT)}


def marked(m: Mirror, side: str) -> set[int]:
    return {i for i, v in enumerate(m.maps[side].regions) if v}


def write_all(lun: Lun, writes: Iterable[tuple[int, int]], seed: int) -> None:
    for i, (off, n) in enumerate(writes):
        lun.write(off, data(n, seed * 1000 + i))


def synced_pair(array: Array) -> Mirror:
    s = array.create_lun("src", SIZE)
    for off in range(0, SIZE, 8 * MiB):  # data in every intent region, holes between
        s.write(off, data(2 * MiB, off))
    m = array.mirrors.create(s, array.create_lun("dst", SIZE))
    drive(array)
    assert m.state == SYNCED
    return m


# -- split: marks written on either side -----------------------------------------------------------


def test_a_crash_while_split_loses_no_mark_on_either_side(arrays: Arrays, array: Array) -> None:
    m = synced_pair(array)
    m.split("rw")
    exact = [(MiB + 5, 3000), (2 * MiB, 64 * KiB)]
    write_all(m.source, exact, seed=1)
    m.checkpoint()  # these marks are saved exactly; the intent log is cleared
    after = [(INTENT_REGION + 7 * MiB, 4096), (3 * INTENT_REGION - 100, 200)]  # 1, 2 and 3
    write_all(m.source, after, seed=2)
    target_writes = [(2 * INTENT_REGION + MiB, 10 * KiB)]
    write_all(m.target, target_writes, seed=3)

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert (m.state, m.record.target_access) == (SPLIT, "rw")
    source_marks, target_marks = marked(m, SOURCE), marked(m, TARGET)
    assert source_marks >= regions(exact + after), "a mark was lost"
    assert target_marks >= regions(target_writes), "a mark was lost"
    # No more than the logged intent regions are added on top of the saved map.
    assert source_marks == regions(exact) | intent_regions(1, 2, 3)
    assert target_marks == intent_regions(2)
    assert not array.mirrors.busy()  # a split mirror waits for resync or restore

    m.resync()
    drive(array)
    assert m.state == SYNCED
    assert m.copied == len(source_marks | target_marks) * GRANULARITY
    assert_identical(m.source, m.target)


def test_a_crash_between_the_source_write_and_the_fan_out_is_resynced(
    arrays: Arrays, array: Array
) -> None:
    m = synced_pair(array)
    assert isinstance(m.source._backend, MirroredBackend)
    # What MirroredBackend.write does, stopped by the crash before the fan-out:
    offset, payload = 3 * INTENT_REGION + 3 * MiB, data(8 * KiB, 4)
    m.before_source_change(offset, len(payload))
    m.source._backend.inner.write(offset, payload)
    assert m.target.backend.read(offset, len(payload)) != payload

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == RESYNCING, "a synced mirror with marks after a crash must resync"
    assert marked(m, SOURCE) == intent_regions(3)
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")
    drive(array)
    assert m.state == SYNCED
    assert m.copied == INTENT_REGION
    assert_identical(m.source, m.target)


def test_a_synced_mirror_without_marks_stays_synced_after_a_crash(
    arrays: Arrays, array: Array
) -> None:
    m = synced_pair(array)
    m.source.write(0, b"fanned out")
    m.checkpoint()  # what the daemon does once writes are idle
    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == SYNCED
    assert not array.mirrors.busy()


# -- copies in progress resume ---------------------------------------------------------------------


def test_a_crash_during_the_initial_sync_resumes_it(arrays: Arrays, array: Array) -> None:
    s = array.create_lun("src", SIZE)
    s.write(0, data(SIZE, 5))
    t = array.create_lun("dst", SIZE)
    t.write(SIZE - MiB, b"\xee" * MiB)
    m = array.mirrors.create(s, t)
    for _ in range(5):
        array.mirrors.copy_step(4 * MiB)
    m.checkpoint()
    for _ in range(3):
        array.mirrors.copy_step(4 * MiB)
    s.write(MiB, b"a host write behind the copy front")

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == SYNCING
    assert m.dirty_bytes() >= SIZE - 32 * MiB
    drive(array)
    assert m.state == SYNCED
    assert_identical(m.source, m.target)


def test_a_crash_during_a_resync_resumes_and_finishes_identical(
    arrays: Arrays, array: Array
) -> None:
    m = synced_pair(array)
    m.split("rw")
    write_all(m.source, [(0, 20 * MiB), (40 * MiB, 3 * MiB)], seed=6)
    write_all(m.target, [(30 * MiB, 5 * MiB), (SIZE - 4096, 4096)], seed=7)
    m.resync()
    for _ in range(4):
        array.mirrors.copy_step(2 * MiB)
    m.checkpoint()  # the daemon checkpoints every second while copying
    for _ in range(3):
        array.mirrors.copy_step(2 * MiB)
    m.source.write(MiB, data(4096, 8))  # behind the copy front: fanned out
    m.source.write(33 * MiB, data(4096, 9))  # ahead of it
    m.source.write(50 * MiB, data(4096, 10))  # outside the dirty regions
    assert m.state == RESYNCING

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == RESYNCING
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")
    drive(array)
    assert m.state == SYNCED
    assert_identical(m.source, m.target)


def test_a_crash_during_a_restore_resumes_and_keeps_the_backup_token(
    arrays: Arrays, array: Array
) -> None:
    m = synced_pair(array)
    m.split()
    backup = [m.target.backend.read(off, 4 * MiB) for off in range(0, SIZE, 4 * MiB)]
    write_all(m.source, [(0, 24 * MiB), (60 * MiB, MiB)], seed=11)
    _, target_token = array.tracker("dst").acquire("backup")
    array.checkpoint(0)  # both LUNs idle and recorded clean before the restore
    m.restore()
    for _ in range(3):
        array.mirrors.copy_step(2 * MiB)
    m.checkpoint()
    array.mirrors.copy_step(2 * MiB)

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == RESTORING
    with pytest.raises(ReadOnly, match="restoring"):
        m.source.write(0, b"x")  # still closed to hosts until the restore is done
    drive(array)
    assert m.state == SPLIT
    assert [m.source.backend.read(off, 4 * MiB) for off in range(0, SIZE, 4 * MiB)] == backup
    # The target was never written: the crash did not change its state (C3).
    assert array.tracker("dst").check(target_token).intact
    m.source.write(0, b"open to hosts again")


# -- the window between saving a new state and saving its maps -------------------------------------


@pytest.mark.parametrize("operation", ["resync", "restore"])
def test_a_crash_right_after_a_copy_starts_loses_no_target_mark(
    arrays: Arrays, array: Array, monkeypatch: pytest.MonkeyPatch, operation: str
) -> None:
    """Starting a copy saves the new state, then the merged maps; a crash in between
    must still copy the regions hosts wrote on the split target."""
    m = synced_pair(array)
    m.split("rw")
    m.source.write(5 * MiB, data(4096, 12))
    m.target.write(45 * MiB, data(4096, 13))
    m.checkpoint()  # exact maps saved, intent log empty

    def crash(*args: object) -> None:
        raise Crash

    monkeypatch.setattr(array.catalog.mirrors, "save_maps", crash)
    with pytest.raises(Crash):
        getattr(m, operation)()
    monkeypatch.undo()

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == (RESYNCING if operation == "resync" else RESTORING)
    drive(array)
    assert m.state == (SYNCED if operation == "resync" else SPLIT)
    assert_identical(m.source, m.target)


def test_a_crash_right_after_a_mirror_is_created_still_copies_everything(
    arrays: Arrays, array: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = array.create_lun("src", SIZE)
    s.write(0, data(SIZE, 14))
    t = array.create_lun("dst", SIZE)
    store = array.catalog.mirrors
    saved = {"record": False}
    save_mirror, save_maps = store.save_mirror, store.save_maps

    def save_mirror_then_note(*args: object) -> None:
        save_mirror(*args)  # type: ignore[arg-type]
        saved["record"] = True

    def crash_once_the_record_is_saved(*args: object) -> None:
        if saved["record"]:
            raise Crash
        save_maps(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(store, "save_mirror", save_mirror_then_note)
    monkeypatch.setattr(store, "save_maps", crash_once_the_record_is_saved)
    with pytest.raises(Crash):
        array.mirrors.create(s, t)
    monkeypatch.undo()

    array = arrays.crash()
    m = array.mirrors.get("dst")
    assert m.state == SYNCING
    drive(array)
    assert m.state == SYNCED
    assert_identical(m.source, m.target)
