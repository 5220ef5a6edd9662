"""Change maps: which regions changed, at a granularity, exactly and never less."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunseal.engine.state.changemap import (
    DEFAULT_GRANULARITY,
    MAX_GRANULARITY,
    MIN_GRANULARITY,
    ChangedExtent,
    ChangeMap,
    validate_granularity,
)
from lunseal.errors import InvalidArgument

KiB = 1 << 10
MiB = 1 << 20


def spans(cmap: ChangeMap) -> list[tuple[int, int]]:
    return [(e.offset, e.length) for e in cmap.extents()]


def test_default_granularity_is_64k() -> None:
    assert 64 * KiB == DEFAULT_GRANULARITY


@pytest.mark.parametrize("granularity", [MIN_GRANULARITY, 64 * KiB, MiB, MAX_GRANULARITY])
def test_valid_granularities(granularity: int) -> None:
    assert validate_granularity(granularity) == granularity
    assert ChangeMap(MiB, granularity).granularity == granularity


@pytest.mark.parametrize(
    "granularity", [0, -4096, 1, 512, 2 * KiB, 3 * KiB, 96 * KiB, 2 * MAX_GRANULARITY]
)
def test_invalid_granularities(granularity: int) -> None:
    with pytest.raises(InvalidArgument, match="power of two"):
        ChangeMap(MiB, granularity)


def test_a_new_map_has_no_changes() -> None:
    cmap = ChangeMap(10 * MiB, 64 * KiB)
    assert cmap.extents() == []
    assert cmap.changed_bytes() == 0
    assert len(cmap.regions) == 160


@pytest.mark.parametrize(
    ("granularity", "offset", "length", "expected"),
    [
        # one byte marks its whole region
        (64 * KiB, 0, 1, [(0, 64 * KiB)]),
        (64 * KiB, 64 * KiB - 1, 1, [(0, 64 * KiB)]),
        (64 * KiB, 64 * KiB, 1, [(64 * KiB, 64 * KiB)]),
        # a write across a boundary marks both neighbours
        (64 * KiB, 64 * KiB - 1, 2, [(0, 128 * KiB)]),
        # aligned writes mark exactly their regions
        (4 * KiB, 8 * KiB, 8 * KiB, [(8 * KiB, 8 * KiB)]),
        (4 * KiB, 8 * KiB, 8 * KiB + 1, [(8 * KiB, 12 * KiB)]),
        # the last region is clipped to the size
        (64 * KiB, MiB - 1, 1, [(MiB - 64 * KiB, 64 * KiB)]),
        # a huge granularity: one region covers the whole LUN, clipped
        (MAX_GRANULARITY, 12345, 1, [(0, MiB)]),
        # zero length marks nothing
        (64 * KiB, 4096, 0, []),
    ],
)
def test_mark_marks_every_touched_region(
    granularity: int, offset: int, length: int, expected: list[tuple[int, int]]
) -> None:
    cmap = ChangeMap(MiB, granularity)
    cmap.mark(offset, length)
    assert spans(cmap) == expected


def test_extents_merge_neighbours_and_keep_gaps() -> None:
    cmap = ChangeMap(MiB, 64 * KiB)
    cmap.mark(0, 1)
    cmap.mark(64 * KiB, 10)  # neighbour: merges with the first
    cmap.mark(256 * KiB, 64 * KiB)
    cmap.mark(MiB - 1, 1)
    assert cmap.extents() == [
        ChangedExtent(0, 128 * KiB),
        ChangedExtent(256 * KiB, 64 * KiB),
        ChangedExtent(MiB - 64 * KiB, 64 * KiB),
    ]
    assert cmap.changed_bytes() == 256 * KiB


def test_size_not_a_multiple_of_the_granularity_is_clipped() -> None:
    size = MiB + 512
    cmap = ChangeMap(size, 64 * KiB)
    assert len(cmap.regions) == 17
    cmap.mark(size - 1, 1)
    assert spans(cmap) == [(MiB, 512)]
    cmap.mark_all()
    assert spans(cmap) == [(0, size)]
    assert cmap.changed_bytes() == size


def test_mark_beyond_the_end_grows_the_map() -> None:
    """A grow is a change of the new tail: marking it extends the map."""
    cmap = ChangeMap(MiB, 64 * KiB)
    cmap.mark(MiB, MiB)
    assert cmap.size == 2 * MiB
    assert spans(cmap) == [(MiB, MiB)]


def test_resize_extends_with_unchanged_regions_and_never_shrinks() -> None:
    cmap = ChangeMap(MiB, 64 * KiB)
    cmap.mark(0, 1)
    cmap.resize(2 * MiB)
    assert (cmap.size, len(cmap.regions)) == (2 * MiB, 32)
    assert spans(cmap) == [(0, 64 * KiB)]
    cmap.resize(MiB)  # LUNs only grow: a smaller size is ignored
    assert cmap.size == 2 * MiB
    cmap.mark_all()
    assert spans(cmap) == [(0, 2 * MiB)]


def test_blob_round_trip_is_exact() -> None:
    cmap = ChangeMap(3 * MiB + 4096, 4 * KiB)
    for offset in (0, 4096 * 7, MiB + 1, 3 * MiB):
        cmap.mark(offset, 5000)
    blob = cmap.to_blob()
    again = ChangeMap.from_blob(cmap.size, cmap.granularity, blob)
    assert again.extents() == cmap.extents()
    assert bytes(again.regions) == bytes(cmap.regions)
    assert len(blob) < len(cmap.regions)  # compressed


def test_from_blob_of_a_smaller_map_pads_to_the_size() -> None:
    small = ChangeMap(MiB, 64 * KiB)
    small.mark(0, 1)
    big = ChangeMap.from_blob(2 * MiB, 64 * KiB, small.to_blob())
    assert len(big.regions) == 32
    assert spans(big) == [(0, 64 * KiB)]


@settings(max_examples=150, deadline=None)
@given(
    exp=st.integers(min_value=12, max_value=17),
    size_sectors=st.integers(min_value=1, max_value=2048),
    marks=st.lists(
        st.tuples(st.integers(min_value=0, max_value=2 * MiB), st.integers(0, 300 * KiB)),
        max_size=12,
    ),
)
def test_extents_are_exactly_the_regions_touched(
    exp: int, size_sectors: int, marks: list[tuple[int, int]]
) -> None:
    """Against a byte-level model: every changed byte is covered, nothing else is,
    and the extents are sorted, disjoint, merged and inside the (grown) size."""
    granularity = 1 << exp
    size = size_sectors * 512
    cmap = ChangeMap(size, granularity)
    touched: set[int] = set()
    model_size = size
    for offset, length in marks:
        cmap.mark(offset, length)
        if length > 0:
            model_size = max(model_size, offset + length)
            touched.update(range(offset // granularity, (offset + length - 1) // granularity + 1))
    assert cmap.size == model_size
    expected_bytes: set[tuple[int, int]] = set()
    for region in touched:
        start = region * granularity
        expected_bytes.add((start, min(start + granularity, model_size)))
    covered: set[tuple[int, int]] = set()
    previous_end = -1
    for ext in cmap.extents():
        assert ext.length > 0
        assert ext.offset > previous_end  # sorted, with a gap: neighbours are merged
        previous_end = ext.offset + ext.length
        assert previous_end <= model_size
        assert ext.offset % granularity == 0
        pos = ext.offset
        while pos < previous_end:
            end = min(pos + granularity, model_size)
            covered.add((pos, end))
            pos = end
    assert covered == expected_bytes
    assert cmap.changed_bytes() == sum(end - start for start, end in expected_bytes)
