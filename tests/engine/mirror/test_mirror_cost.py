"""What mirror metadata costs, counted rather than timed: status calls never
scan or copy a map, intent-log commits are batched, split and finish flush each
side once."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import SupportsIndex

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.layers import MirroredBackend
from lunseal.engine.mirror.mirror import (
    GRANULARITY,
    INTENT_REGION,
    SOURCE,
    SPLIT,
    SYNCED,
    TARGET,
    Mirror,
)
from lunseal.engine.state.changemap import ChangeMap
from lunseal.frontends.api.mirror_routes import mirror_info
from tests.engine.mirror.test_mirror import data, drive, synced_pair
from tests.support.arrays import Arrays

MiB = 1 << 20
TiB = 1 << 40


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


@pytest.fixture
def array(arrays: Arrays) -> Array:
    return arrays.open()


class ScanCounter(bytearray):
    """A map's bytes that count every whole-map search."""

    scans = 0

    def count(self, *args: object) -> int:
        ScanCounter.scans += 1
        return super().count(*args)  # type: ignore[arg-type]

    def find(self, *args: object) -> int:
        ScanCounter.scans += 1
        return super().find(*args)  # type: ignore[arg-type]

    def __getitem__(self, index: SupportsIndex | slice) -> int | bytearray:  # type: ignore[override]
        if isinstance(index, slice):
            ScanCounter.scans += 1  # a copy of (part of) the map
        return super().__getitem__(index)


def huge_split_mirror(array: Array, dirty: int) -> Mirror:
    """A split mirror whose maps describe a 1 TiB LUN with ``dirty`` regions marked."""
    m = synced_pair(array)
    m.split()
    count = TiB // GRANULARITY
    for side in (SOURCE, TARGET):
        m.maps[side] = ChangeMap(TiB, GRANULARITY, ScanCounter(count))
    m.union = ChangeMap(TiB, GRANULARITY, ScanCounter(count))  # both maps are empty
    rng = random.Random(3)
    for i, region in enumerate(rng.sample(range(count), dirty)):
        side = SOURCE if i % 5 else TARGET
        m._mark(side, region * GRANULARITY, GRANULARITY)
    return m


def test_status_of_a_1_tib_mirror_neither_scans_nor_copies_its_maps(array: Array) -> None:
    m = huge_split_mirror(array, 2_000)
    assert m.state == SPLIT
    # Wrap the maps in scan counters only now: building them may search.
    ScanCounter.scans = 0
    tracemalloc.start()
    try:
        for _ in range(10):
            info = mirror_info(m)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.source_dirty_regions + info.target_dirty_regions == 2_000
    assert info.bytes_left == 2_000 * GRANULARITY
    assert ScanCounter.scans == 0
    assert peak < 1 * MiB  # the map is 16 MiB: a copy per call would show


def test_dirty_counts_follow_marks_clears_merges_and_the_short_last_region() -> None:
    size = 10 * GRANULARITY + 512  # the last region holds 512 bytes
    cmap = ChangeMap(size, GRANULARITY)
    other = ChangeMap(size, GRANULARITY)
    rng = random.Random(5)
    for _ in range(300):
        target = cmap if rng.random() < 0.7 else other
        offset = rng.randrange(size)
        length = rng.randrange(1, size - offset + 1)
        op = rng.random()
        if op < 0.5:
            target.mark(offset, length)
        elif op < 0.8:
            target.clear(offset, length)
        else:
            cmap.merge(other)
        for m in (cmap, other):
            marked = [i for i, v in enumerate(bytes(m.regions)) if v]
            assert m.changed_regions() == len(marked)
            assert m.changed_bytes() == sum(e.length for e in m.extents())


def test_a_write_across_several_intent_regions_is_one_commit(
    array: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = array.create_lun("src", 64 * MiB)
    target = array.create_lun("dst", 64 * MiB)
    m = array.mirrors.create(source, target)
    drive(array, budget=16 * MiB)
    assert m.state == SYNCED
    m.checkpoint()  # the intent log is empty
    commits = count_intent_commits(monkeypatch, m)
    source.write(INTENT_REGION - 4096, data(2 * INTENT_REGION + 8192, 1))  # 4 intent regions
    assert commits == [4]
    assert m._intents == {(SOURCE, r) for r in range(4)}


def test_a_batch_of_writes_logs_its_intent_regions_in_one_commit(
    array: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = array.create_lun("src", 64 * MiB)
    target = array.create_lun("dst", 64 * MiB)
    m = array.mirrors.create(source, target)
    drive(array, budget=16 * MiB)
    m.checkpoint()
    commits = count_intent_commits(monkeypatch, m)
    batch = [(r * INTENT_REGION + 4096 * r, 4096) for r in range(4)]
    fanout = source.top_layer(MirroredBackend)
    assert fanout is not None
    fanout.log_intents(batch)  # what a worker does before running a batch
    for i, (offset, length) in enumerate(batch):
        source.write(offset, data(length, i))
    assert commits == [4]  # one commit for the batch; the writes found their regions logged
    source.write(0, data(4096, 9))  # an intent region already logged: no commit at all
    assert commits == [4]
    # After a crash the logged regions are marked: nothing the batch wrote is lost.
    _, intents = array.catalog.mirrors.load_maps(m.record.id, source.size)
    assert intents == {(SOURCE, r) for r in range(4)}


def count_intent_commits(monkeypatch: pytest.MonkeyPatch, m: Mirror) -> list[int]:
    """One entry per durable intent-log commit: how many regions it logged."""
    store = m.store
    commits: list[int] = []
    if hasattr(store, "log_intent"):  # one commit per region (before batching)
        single = store.log_intent

        def one(mirror_id: str, side: str, region: int) -> None:
            commits.append(1)
            single(mirror_id, side, region)

        monkeypatch.setattr(store, "log_intent", one)
    if hasattr(store, "log_intents"):
        many = store.log_intents

        def batch(mirror_id: str, side: str, regions: list[int]) -> None:
            commits.append(len(regions))
            many(mirror_id, side, regions)

        monkeypatch.setattr(store, "log_intents", batch)
    return commits


def count_flushes(monkeypatch: pytest.MonkeyPatch, m: Mirror) -> dict[str, int]:
    """fdatasyncs of each side's backing file."""
    flushes = {SOURCE: 0, TARGET: 0}
    source = m.source.top_layer(MirroredBackend)
    assert source is not None
    for side, backend in ((SOURCE, source.inner), (TARGET, m.target._backend)):
        real = backend.flush

        def counted(side: str = side, real: object = real) -> None:
            flushes[side] += 1
            real()  # type: ignore[operator]

        monkeypatch.setattr(backend, "flush", counted)
    return flushes


def test_split_flushes_each_side_once(array: Array, monkeypatch: pytest.MonkeyPatch) -> None:
    m = synced_pair(array)
    m.source.write(0, data(4096, 2))
    flushes = count_flushes(monkeypatch, m)
    m.split()
    assert flushes == {SOURCE: 1, TARGET: 1}


def test_the_end_of_a_resync_flushes_each_side_once(
    array: Array, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = synced_pair(array)
    m.split()
    m.source.write(0, data(4096, 3))
    m.resync()
    flushes = count_flushes(monkeypatch, m)
    m.copy_step()  # copies the one region and finishes
    assert m.state == SYNCED
    assert flushes == {SOURCE: 1, TARGET: 1}
