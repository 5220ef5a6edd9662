"""Mirrors in-process on real files: sync, fan-out, split, resync, restore, faults.

Every test drives the copy itself with ``copy_step`` (the daemon's background
loop does the same), so host writes can be interleaved between copy steps at
exactly the points a test wants.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.file import FileBackend
from lunseal.engine.backends.layers import FaultyBackend, MirroredBackend
from lunseal.engine.lun import Lun
from lunseal.engine.mirror.mirror import (
    DEGRADED,
    GRANULARITY,
    RESTORING,
    RESYNCING,
    SOURCE,
    SPLIT,
    SYNCED,
    SYNCING,
    TARGET,
    Mirror,
)
from lunseal.errors import BackendError, Conflict, InvalidArgument, NotFound, ReadOnly
from tests.support.arrays import Arrays

KiB = 1 << 10
MiB = 1 << 20
SIZE = 16 * MiB

#: (offset, length) writes; several straddle a 64 KiB region boundary.
SOURCE_WRITES = [
    (0, 512),
    (GRANULARITY - 100, 200),
    (3 * MiB + 4 * KiB, 300 * KiB),
    (SIZE - 4096, 4096),
]
TARGET_WRITES = [(GRANULARITY - 100, 200), (5 * MiB, 4096), (9 * MiB + 7, 70 * KiB)]


# -- set-up ---------------------------------------------------------------------------------


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


def filled(array: Array, name: str, seed: int, size: int = SIZE) -> Lun:
    lun = array.create_lun(name, size)
    lun.write(0, data(size, seed))
    return lun


def drive(array: Array, budget: int = 1 * MiB, limit: int = 10_000) -> int:
    """Run copy steps until no mirror copies; returns the steps taken."""
    for step in range(limit):
        if not array.mirrors.busy():
            return step
        array.mirrors.copy_step(budget)
    raise AssertionError("the copy did not finish")


def content(lun: Lun) -> bytes:
    return lun.backend.read(0, lun.size)


def assert_identical(a: Lun, b: Lun) -> None:
    assert a.size == b.size
    for off in range(0, a.size, MiB):
        n = min(MiB, a.size - off)
        assert a.backend.read(off, n) == b.backend.read(off, n), f"{a.name} != {b.name} at {off}"


def regions(writes: Iterable[tuple[int, int]]) -> set[int]:
    found: set[int] = set()
    for off, n in writes:
        found.update(range(off // GRANULARITY, (off + n - 1) // GRANULARITY + 1))
    return found


def marked(m: Mirror, side: str) -> set[int]:
    return {i for i, v in enumerate(m.maps[side].regions) if v}


def synced_pair(array: Array, source: str = "src", target: str = "dst") -> Mirror:
    s = array.find(source) or filled(array, source, seed=1)
    t = array.create_lun(target, s.size)
    m = array.mirrors.create(s, t)
    drive(array)
    assert m.state == SYNCED
    return m


def write_all(lun: Lun, writes: Iterable[tuple[int, int]], seed: int) -> None:
    for i, (off, n) in enumerate(writes):
        lun.write(off, data(n, seed * 1000 + i))


# -- initial sync -------------------------------------------------------------------------------


def test_initial_sync_with_host_writes_between_steps_makes_the_sides_identical(
    array: Array,
) -> None:
    s = filled(array, "src", seed=1)
    s.trim(8 * MiB, 2 * MiB)  # a hole in the middle: copied as zeroes
    t = array.create_lun("dst", SIZE)
    t.write(8 * MiB, b"\xff" * MiB)  # stale data the sync must overwrite with zeroes
    t.write(SIZE - MiB, b"\xee" * MiB)
    m = array.mirrors.create(s, t)
    assert m.state == SYNCING
    assert m.dirty_bytes() == SIZE
    assert m.progress() == 0.0
    assert array.mirrors.busy()

    rng = random.Random(7)
    steps = 0
    progress = [m.progress()]
    while m.state == SYNCING:
        assert array.mirrors.copy_step(512 * KiB) > 0 or m.state == SYNCED
        steps += 1
        # Host writes land both behind and ahead of the copy front.
        off = rng.randrange(0, SIZE - 8 * KiB)
        s.write(off, data(rng.randrange(1, 8 * KiB), steps))
        if steps % 5 == 0:
            s.zero(rng.randrange(0, SIZE // 4096) * 4096, 4096)
        if steps % 7 == 0:
            s.trim(rng.randrange(0, SIZE // 4096) * 4096, 8192)
        progress.append(m.progress())
        assert steps < 500
    assert m.state == SYNCED
    assert steps > 10  # the writes really were interleaved with the copy
    assert m.copied >= SIZE
    assert 0.0 < sorted(progress)[len(progress) // 2] < 100.0
    assert m.progress() == 100.0
    assert_identical(s, t)
    assert not array.mirrors.busy()


def test_a_hole_in_the_source_becomes_zeroes_on_the_target(array: Array) -> None:
    s = array.create_lun("src", SIZE)  # all hole
    t = filled(array, "dst", seed=3)
    array.mirrors.create(s, t)
    drive(array)
    assert content(t) == bytes(SIZE)


# -- synced: synchronous fan-out, target read-only for hosts --------------------------------------


def test_synced_writes_reach_the_target_before_they_are_acknowledged(array: Array) -> None:
    m = synced_pair(array)
    s, t = m.source, m.target
    assert isinstance(s._backend, MirroredBackend)

    s.write(MiB + 3, b"fan-out")
    assert t.backend.read(MiB + 3, 7) == b"fan-out"  # no copy step in between
    s.write(2 * MiB, b"\x01" * 8192, fua=True)
    assert t.backend.read(2 * MiB, 8192) == b"\x01" * 8192
    s.zero(2 * MiB, 4096)
    assert t.backend.read(2 * MiB, 8192) == bytes(4096) + b"\x01" * 4096
    s.trim(0, 64 * KiB)
    assert t.backend.read(0, 64 * KiB) == bytes(64 * KiB)
    s.flush()
    assert m.state == SYNCED
    assert_identical(s, t)
    assert not array.mirrors.busy()  # nothing was left for a copy to do


def test_a_synced_target_is_read_only_for_hosts(array: Array) -> None:
    m = synced_pair(array)
    t = m.target
    before = content(t)
    assert t.read_only
    ops: tuple[Callable[[], None], ...] = (
        lambda: t.write(0, b"x"),
        lambda: t.zero(0, 4096),
        lambda: t.trim(0, 4096),
    )
    for op in ops:
        with pytest.raises(ReadOnly, match="target of mirror dst"):
            op()
    assert content(t) == before
    assert t.read(0, 4) == before[:4]  # reads are fine
    assert not t.record.read_only  # a guard, not the LUN's own flag


def test_the_target_is_read_only_while_syncing_too(array: Array) -> None:
    s = filled(array, "src", seed=1)
    t = array.create_lun("dst", SIZE)
    array.mirrors.create(s, t)
    with pytest.raises(ReadOnly):
        t.write(0, b"x")


# -- split and resync ------------------------------------------------------------------------------


def test_split_ro_keeps_the_target_read_only_and_rw_opens_it(array: Array) -> None:
    m = synced_pair(array)
    m.split()
    assert (m.state, m.record.target_access) == (SPLIT, "ro")
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")
    m.source.write(0, b"only on the source")
    assert m.target.backend.read(0, 4) != b"only"
    m.resync()
    drive(array)
    m.split("rw")
    m.target.write(0, b"now the target is writable")
    assert m.target.backend.read(0, 3) == b"now"
    assert m.source.backend.read(0, 4) == b"only"


def test_split_records_the_regions_written_on_each_side(array: Array) -> None:
    m = synced_pair(array)
    before = time.time()
    m.split("rw")
    assert m.record.split_at is not None
    assert before <= m.record.split_at <= time.time()
    assert m.dirty_bytes() == 0
    write_all(m.source, SOURCE_WRITES, seed=2)
    write_all(m.target, TARGET_WRITES, seed=3)
    assert marked(m, SOURCE) == regions(SOURCE_WRITES)
    assert marked(m, TARGET) == regions(TARGET_WRITES)
    union = regions(SOURCE_WRITES) | regions(TARGET_WRITES)
    assert m.dirty_bytes() == len(union) * GRANULARITY
    # The sides really differ now; nothing is fanned out while split.
    assert content(m.source) != content(m.target)


def test_resync_copies_exactly_the_union_of_both_sides_regions(array: Array) -> None:
    m = synced_pair(array)
    m.split("rw")
    write_all(m.source, SOURCE_WRITES, seed=2)
    write_all(m.target, TARGET_WRITES, seed=3)
    union = regions(SOURCE_WRITES) | regions(TARGET_WRITES)
    assert len(union) < SIZE // GRANULARITY // 10  # far from a full copy

    m.resync()
    assert m.state == RESYNCING
    assert m.record.op_total == len(union) * GRANULARITY
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")  # the target is read-only again as soon as resync starts
    drive(array, budget=64 * KiB)

    assert m.state == SYNCED
    assert m.copied == len(union) * GRANULARITY
    assert_identical(m.source, m.target)
    assert m.dirty_bytes() == 0
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")


def test_host_writes_during_a_resync_are_mirrored(array: Array) -> None:
    m = synced_pair(array)
    m.split()
    m.source.write(0, data(4 * MiB, 5))
    m.resync()
    array.mirrors.copy_step(GRANULARITY)
    # Ahead of the copy front, behind it, and outside the dirty regions.
    m.source.write(3 * MiB, b"ahead" * 1000)
    m.source.write(0, b"behind" * 1000)
    m.source.write(12 * MiB, b"elsewhere" * 1000)
    drive(array, budget=256 * KiB)
    assert m.state == SYNCED
    assert_identical(m.source, m.target)


def test_resync_without_writes_copies_nothing_and_keeps_the_target_token(array: Array) -> None:
    m = synced_pair(array)
    _, token = array.tracker("dst").acquire("backup")
    m.split()
    m.resync()
    drive(array)
    assert m.state == SYNCED
    assert m.copied == 0
    assert array.tracker("dst").check(token).intact


def test_resync_changes_the_target_token_and_not_the_source_token(array: Array) -> None:
    m = synced_pair(array)
    m.split()
    m.source.write(5 * MiB, b"new data")
    _, source_token = array.tracker("src").acquire("backup")
    _, target_token = array.tracker("dst").acquire("backup")
    m.resync()
    drive(array)
    target_check = array.tracker("dst").check(target_token)
    assert not target_check.intact, "the array's copy into the target must change its state (C1)"
    assert array.tracker("src").check(source_token).intact


def test_the_initial_sync_changes_the_target_token(array: Array) -> None:
    s = filled(array, "src", seed=1)
    t = array.create_lun("dst", SIZE)
    _, token = array.tracker("dst").acquire()
    array.mirrors.create(s, t)
    drive(array)
    assert not array.tracker("dst").check(token).intact


# -- restore ---------------------------------------------------------------------------------------


def test_restore_copies_the_union_back_and_leaves_the_backup_intact(array: Array) -> None:
    m = synced_pair(array)
    m.split("rw")
    backup_before_target_writes = content(m.target)
    write_all(m.target, TARGET_WRITES, seed=3)  # e.g. a host fixing up the backup copy
    backup = content(m.target)
    assert backup != backup_before_target_writes
    write_all(m.source, SOURCE_WRITES, seed=2)  # the damage to undo
    _, target_token = array.tracker("dst").acquire("backup")
    _, source_token = array.tracker("src").acquire("backup")
    union = regions(SOURCE_WRITES) | regions(TARGET_WRITES)

    m.restore()
    assert m.state == RESTORING
    with pytest.raises(ReadOnly, match="restoring"):
        m.source.write(0, b"x")  # hosts may not write the source while it is restored
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")
    drive(array, budget=128 * KiB)

    assert m.state == SPLIT
    assert m.record.target_access == "rw"
    assert m.copied == len(union) * GRANULARITY
    assert content(m.source) == backup
    assert content(m.target) == backup
    assert array.tracker("dst").check(target_token).intact, "a restore must not touch the backup"
    assert not array.tracker("src").check(source_token).intact
    assert m.dirty_bytes() == 0
    m.source.write(0, b"hosts may write the source again")


def test_the_same_backup_serves_another_restore_then_resync_follows_the_source(
    array: Array,
) -> None:
    m = synced_pair(array)
    m.split()
    backup = content(m.target)
    _, target_token = array.tracker("dst").acquire("backup")
    for attempt in range(2):
        write_all(m.source, SOURCE_WRITES, seed=10 + attempt)
        assert content(m.source) != backup
        m.restore()
        drive(array)
        assert m.state == SPLIT
        assert m.copied == len(regions(SOURCE_WRITES)) * GRANULARITY
        assert content(m.source) == backup
    assert array.tracker("dst").check(target_token).intact

    m.source.write(MiB, b"after the restore")
    m.resync()
    drive(array)
    assert m.state == SYNCED
    assert m.copied == GRANULARITY
    assert_identical(m.source, m.target)
    assert not array.tracker("dst").check(target_token).intact


def test_restore_of_a_hole_zeroes_the_source(array: Array) -> None:
    s = array.create_lun("src", SIZE)
    t = array.create_lun("dst", SIZE)
    m = array.mirrors.create(s, t)
    drive(array)
    m.split()
    s.write(4 * MiB, data(MiB, 9))
    m.restore()
    drive(array)
    assert s.backend.read(4 * MiB, MiB) == bytes(MiB)


@pytest.mark.parametrize(
    ("action", "state"),
    [("split", SYNCING), ("restore", SYNCING), ("resync", SYNCING), ("restore", SYNCED)],
)
def test_operations_refused_in_the_wrong_state(array: Array, action: str, state: str) -> None:
    s = filled(array, "src", seed=1)
    m = array.mirrors.create(s, array.create_lun("dst", SIZE))
    if state == SYNCED:
        drive(array)
    assert m.state == state
    with pytest.raises(Conflict, match=f"is {state}"):
        getattr(m, action)()
    assert m.state == state


def test_resync_of_a_synced_mirror_and_split_of_a_split_one_are_refused(array: Array) -> None:
    m = synced_pair(array)
    with pytest.raises(Conflict):
        m.resync()
    m.split()
    with pytest.raises(Conflict):
        m.split()
    m.restore()
    with pytest.raises(Conflict):
        m.restore()
    with pytest.raises(Conflict):
        m.resync()


# -- several targets per source (rotating copies) --------------------------------------------------


def test_several_targets_each_keep_their_own_split_time_and_maps(array: Array) -> None:
    s = filled(array, "src", seed=1)
    ms = [array.mirrors.create(s, array.create_lun(f"copy{i}", SIZE)) for i in range(3)]
    drive(array)
    assert [m.state for m in ms] == [SYNCED] * 3
    assert isinstance(s._backend, MirroredBackend)
    assert len(s._backend.mirrors) == 3
    m0, m1, m2 = ms

    m0.split()
    snapshot0 = content(s)
    batch1 = [(MiB, 4096), (2 * MiB, 128 * KiB)]
    write_all(s, batch1, seed=20)
    time.sleep(0.01)
    m1.split()
    snapshot1 = content(s)
    batch2 = [(6 * MiB, 4096), (MiB, 10)]
    write_all(s, batch2, seed=21)

    assert m0.record.split_at is not None
    assert m1.record.split_at is not None
    assert m0.record.split_at < m1.record.split_at
    assert m2.record.split_at is None
    assert content(m0.target) == snapshot0
    assert content(m1.target) == snapshot1
    assert_identical(s, m2.target)  # still synced: saw every write
    assert marked(m0, SOURCE) == regions(batch1 + batch2)
    assert marked(m1, SOURCE) == regions(batch2)

    # Roll the source back to the oldest copy: the restore's writes are changes
    # to the source, so the other split copy records them and the synced one follows.
    m0.restore()
    drive(array)
    assert m0.state == SPLIT
    assert content(s) == snapshot0
    assert_identical(s, m2.target)
    assert m2.state == SYNCED
    assert marked(m1, SOURCE) == regions(batch1 + batch2)

    m1.resync()
    drive(array)
    assert m1.copied == len(regions(batch1 + batch2)) * GRANULARITY
    assert_identical(s, m1.target)
    assert [m.state for m in ms] == [SPLIT, SYNCED, SYNCED]
    assert array.mirrors.get("copy1") is m1


def test_a_target_cannot_join_a_second_mirror_nor_become_a_source(array: Array) -> None:
    m = synced_pair(array)
    other = array.create_lun("other", SIZE)
    with pytest.raises(Conflict, match="already belongs"):
        array.mirrors.create(other, m.target, name="again")
    with pytest.raises(Conflict, match="already belongs"):
        array.mirrors.create(m.source, m.target, name="twice")
    with pytest.raises(Conflict, match="target of mirror"):
        array.mirrors.create(m.target, other)
    with pytest.raises(Conflict, match="already belongs"):
        array.mirrors.create(other, m.source)  # a source cannot be a target (no cascade)
    with pytest.raises(Conflict, match="already exists"):
        array.mirrors.create(m.source, other, name="dst")
    assert [x.name for x in array.mirrors.all()] == ["dst"]
    assert not isinstance(other._backend, MirroredBackend)
    other.write(0, b"other is untouched by the refusals")


def test_create_refuses_itself_a_size_mismatch_and_a_read_only_target(array: Array) -> None:
    s = filled(array, "src", seed=1)
    with pytest.raises(InvalidArgument, match="itself"):
        array.mirrors.create(s, s)
    small = array.create_lun("small", SIZE // 2)
    with pytest.raises(InvalidArgument, match="same size"):
        array.mirrors.create(s, small)
    ro = array.create_lun("ro", SIZE, read_only=True)
    with pytest.raises(Conflict, match="read-only"):
        array.mirrors.create(s, ro)
    with pytest.raises(InvalidArgument, match="invalid"):
        array.mirrors.create(s, array.create_lun("fine", SIZE), name="bad name")
    assert array.mirrors.all() == []
    assert isinstance(s._backend, FileBackend)


# -- faults ----------------------------------------------------------------------------------------


def test_a_failing_target_degrades_the_mirror_and_never_fails_the_host(array: Array) -> None:
    m = synced_pair(array)
    s, t = m.source, m.target
    faulty = FaultyBackend(t._backend)
    t._backend = faulty
    target_before = content(t)
    faulty.fail_writes = True

    s.write(3 * MiB, b"A" * 4096)  # acknowledged: no exception
    assert m.state == DEGRADED
    assert "injected write failure" in m.record.reason
    assert "dst" in m.record.reason
    s.write(7 * MiB + 5, b"B" * 100)  # degraded: recorded, not sent
    s.zero(9 * MiB, 64 * KiB)
    s.flush()
    assert s.backend.read(3 * MiB, 4096) == b"A" * 4096
    assert content(t) == target_before
    assert marked(m, SOURCE) >= regions([(3 * MiB, 4096), (7 * MiB + 5, 100), (9 * MiB, 64 * KiB)])
    with pytest.raises(ReadOnly):
        t.write(0, b"x")  # still not for hosts
    with pytest.raises(Conflict):
        m.split()
    with pytest.raises(Conflict):
        m.restore()

    faulty.fail_writes = False
    m.resync()
    drive(array)
    assert m.state == SYNCED
    assert m.record.reason == ""
    assert m.copied == 3 * GRANULARITY
    assert_identical(s, t)


def test_a_target_failing_during_a_copy_degrades_and_resync_finishes_it(array: Array) -> None:
    s = filled(array, "src", seed=1)
    t = array.create_lun("dst", SIZE)
    faulty = FaultyBackend(t._backend)
    t._backend = faulty
    m = array.mirrors.create(s, t)
    array.mirrors.copy_step(2 * MiB)
    faulty.fail_writes = True
    array.mirrors.copy_step(2 * MiB)
    assert m.state == DEGRADED
    assert "copy" in m.record.reason
    assert not array.mirrors.busy()
    assert m.dirty_bytes() == SIZE - 2 * MiB  # only the copied part was forgotten

    faulty.fail_writes = False
    m.resync()
    drive(array)
    assert m.state == SYNCED
    assert_identical(s, t)


def test_a_failing_source_fails_the_host_write_and_degrades_the_mirror(array: Array) -> None:
    """A failed source write may have changed the source partly: nobody can tell
    whether the sides still match, so the mirror degrades and a resync equalises them."""
    m = synced_pair(array)
    s, t = m.source, m.target
    assert isinstance(s._backend, MirroredBackend)
    faulty = FaultyBackend(s._backend.inner)
    s._backend.inner = faulty
    target_before = t.backend.read(0, MiB)
    faulty.fail_writes = True
    with pytest.raises(BackendError, match="injected write failure"):
        s.write(0, b"lost" * 100)
    with pytest.raises(BackendError):
        s.zero(0, 4096)
    assert m.state == DEGRADED
    assert "source write 0+400 failed" in m.record.reason
    assert t.backend.read(0, MiB) == target_before  # not written to one side only
    assert m.maps["source"].changed_regions() >= 1  # the region stays marked

    faulty.fail_writes = False
    s.write(0, b"kept" * 100)
    m.resync()
    while m.state == RESYNCING:
        m.copy_step()
    assert m.state == SYNCED
    assert t.backend.read(0, 400) == b"kept" * 100
    assert_identical(s, t)


def test_a_failed_restore_stays_split_so_it_can_be_retried(array: Array) -> None:
    """A restore that cannot write the source must not end in a state whose only
    way out is a resync, which would overwrite the backup with the half-restored source."""
    m = synced_pair(array)
    m.split()
    backup = content(m.target)
    _, target_token = array.tracker("dst").acquire("backup")
    write_all(m.source, [(0, 4 * MiB)], seed=30)
    assert isinstance(m.source._backend, MirroredBackend)
    faulty = FaultyBackend(m.source._backend.inner)
    m.source._backend.inner = faulty
    m.restore()
    array.mirrors.copy_step(MiB)
    faulty.fail_writes = True
    array.mirrors.copy_step(MiB)
    assert m.state == SPLIT
    assert "restore" in m.record.reason
    assert "injected" in m.record.reason
    assert not array.mirrors.busy()

    faulty.fail_writes = False
    m.restore()
    drive(array)
    assert m.state == SPLIT
    assert m.record.reason == ""
    assert content(m.source) == backup
    assert array.tracker("dst").check(target_token).intact


# -- delete ----------------------------------------------------------------------------------------


def test_delete_keeps_both_luns_and_unwraps_the_source(arrays: Arrays, array: Array) -> None:
    m = synced_pair(array)
    s, t = m.source, m.target
    array.mirrors.delete("dst")
    assert isinstance(s._backend, FileBackend)
    assert not t.read_only
    with pytest.raises(NotFound):
        array.mirrors.get("dst")
    s.write(0, b"source only")
    t.write(0, b"target only")
    assert t.backend.read(0, 11) == b"target only"
    assert {lun.name for lun in array.luns()} == {"src", "dst"}

    array = arrays.restart()
    assert array.mirrors.all() == []
    assert isinstance(array.lun("src")._backend, FileBackend)
    assert array.lun("dst").read(0, 11) == b"target only"


def test_deleting_one_of_two_mirrors_keeps_the_other_working(array: Array) -> None:
    m1 = synced_pair(array, target="one")
    m2 = synced_pair(array, target="two")
    array.mirrors.delete("one")
    s = m1.source
    assert isinstance(s._backend, MirroredBackend)
    assert s._backend.mirrors == [m2]
    s.write(0, b"still fanned out")
    assert m2.target.backend.read(0, 5) == b"still"
    assert m1.target.backend.read(0, 5) != b"still"
    array.mirrors.delete("two")
    assert isinstance(s._backend, FileBackend)


def test_a_mirror_is_found_by_its_name_or_its_target(array: Array) -> None:
    s = filled(array, "src", seed=1)
    m = array.mirrors.create(s, array.create_lun("dst", SIZE), name="nightly")
    assert array.mirrors.get("nightly") is m
    assert array.mirrors.get("dst") is m
    with pytest.raises(NotFound):
        array.mirrors.get("src")
    with pytest.raises(NotFound):
        array.mirrors.delete("nope")


def test_a_lun_in_a_mirror_is_deleted_only_with_force_and_cannot_grow(array: Array) -> None:
    m = synced_pair(array)
    for name in ("src", "dst"):
        with pytest.raises(Conflict, match="mirror"):
            array.delete_lun(name)
        with pytest.raises(Conflict, match="mirror"):
            array.grow_lun(name, 2 * SIZE)
    assert array.mirrors.get("dst") is m
    array.delete_lun("dst", force=True)
    assert array.mirrors.all() == []
    assert isinstance(array.lun("src")._backend, FileBackend)
    array.lun("src").write(0, b"fine")
    array.grow_lun("src", 2 * SIZE)


# -- persistence -----------------------------------------------------------------------------------


def test_a_split_mirror_survives_a_restart_with_its_maps_and_split_time(
    arrays: Arrays, array: Array
) -> None:
    m = synced_pair(array)
    m.split("rw")
    write_all(m.source, SOURCE_WRITES, seed=2)
    write_all(m.target, TARGET_WRITES, seed=3)
    split_at, mirror_id = m.record.split_at, m.record.id
    maps = {side: bytes(m.maps[side].regions) for side in (SOURCE, TARGET)}

    array = arrays.restart()
    m = array.mirrors.get("dst")
    assert (m.record.id, m.state, m.record.target_access) == (mirror_id, SPLIT, "rw")
    assert m.record.split_at == split_at
    # A clean shutdown saves the exact maps, not the intent log's coarse regions.
    assert {side: bytes(m.maps[side].regions) for side in (SOURCE, TARGET)} == maps
    assert isinstance(m.source._backend, MirroredBackend)
    m.target.write(11 * MiB, b"still writable after the restart")
    assert marked(m, TARGET) == regions([*TARGET_WRITES, (11 * MiB, 32)])

    m.resync()
    drive(array)
    assert_identical(m.source, m.target)


def test_a_synced_mirror_survives_a_restart_and_keeps_fanning_out(
    arrays: Arrays, array: Array
) -> None:
    synced_pair(array)
    array = arrays.restart()
    m = array.mirrors.get("dst")
    assert m.state == SYNCED
    assert m.dirty_bytes() == 0
    assert not array.mirrors.busy()  # a clean restart resyncs nothing
    with pytest.raises(ReadOnly):
        m.target.write(0, b"x")
    m.source.write(MiB, b"after restart")
    assert m.target.backend.read(MiB, 5) == b"after"


def test_a_degraded_mirror_survives_a_restart_with_its_reason(arrays: Arrays, array: Array) -> None:
    m = synced_pair(array)
    faulty = FaultyBackend(m.target._backend)
    m.target._backend = faulty
    faulty.fail_writes = True
    m.source.write(MiB, b"missed by the target")
    reason = m.record.reason
    faulty.fail_writes = False

    array = arrays.restart()
    m = array.mirrors.get("dst")
    assert (m.state, m.record.reason) == (DEGRADED, reason)
    assert marked(m, SOURCE) == {MiB // GRANULARITY}
    m.resync()
    drive(array)
    assert_identical(m.source, m.target)


def test_a_running_copy_resumes_after_a_restart(arrays: Arrays, array: Array) -> None:
    s = filled(array, "src", seed=1)
    m = array.mirrors.create(s, array.create_lun("dst", SIZE))
    array.mirrors.copy_step(4 * MiB)
    array = arrays.restart()
    m = array.mirrors.get("dst")
    assert m.state == SYNCING
    assert m.dirty_bytes() == SIZE - 4 * MiB
    assert m.record.op_total == SIZE
    assert m.progress() == pytest.approx(25.0)
    drive(array)
    assert m.copied == SIZE - 4 * MiB
    assert_identical(m.source, m.target)
