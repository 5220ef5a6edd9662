"""One conformance kit for every :class:`~lunseal.engine.backends.base.Backend`.

Subclass :class:`BackendConformance` in a ``test_*`` module and override the
``make`` fixture with a factory ``make(size) -> Backend``; every test below
then runs against that backend.  The kit checks only what the interface
promises, so a new backend passes it or has a bug.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lunseal.engine.backends.base import Backend, Extent, FileSlice
from lunseal.errors import NotSupported

KiB = 1 << 10
MiB = 1 << 20
SIZE = 1 * MiB

#: ``make(size)`` returns a fresh, empty backend of that size.
BackendFactory = Callable[[int], Backend]


def check_extents(backend: Backend, offset: int, length: int) -> list[Extent]:
    """Query extents and assert the shape the interface promises."""
    extents = backend.extents(offset, length)
    end = min(offset + length, backend.size)
    assert extents, "extents must cover a non-empty range"
    assert extents[0].offset <= offset
    assert extents[-1].end >= end
    assert extents[-1].end <= backend.size, "extents must be clipped to the size"
    for ext in extents:
        assert ext.length > 0
        assert not ext.hole or ext.zero, "a hole always reads as zeroes"
    for prev, nxt in itertools.pairwise(extents):
        assert prev.end == nxt.offset, "extents must be contiguous and in order"
        assert (prev.hole, prev.zero) != (nxt.hole, nxt.zero), "neighbours must be merged"
    return extents


def slice_bytes(piece: bytes | FileSlice) -> bytes:
    """The bytes a front end would send for a ``read_slice`` result."""
    if isinstance(piece, bytes):
        return piece
    data = os.pread(piece.fd, piece.length, piece.offset)
    return data + bytes(piece.length - len(data))  # past the file's end reads as zeroes


def assert_extents_match_data(backend: Backend, offset: int, length: int) -> None:
    """Every extent that claims zeroes must read as zeroes (the reverse is optional)."""
    for ext in check_extents(backend, offset, length):
        if ext.zero:
            start = max(ext.offset, offset)
            stop = min(ext.end, offset + length, backend.size)
            assert backend.read(start, stop - start) == bytes(stop - start), ext


# -- operations for the model-based test -----------------------------------------------

MODEL_SIZE = 10 * 4096 + 512


class Op:
    def apply(self, backend: Backend, model: bytearray) -> None:
        raise NotImplementedError


class Write(Op):
    def __init__(self, offset: int, data: bytes) -> None:
        self.offset, self.data = offset, data

    def apply(self, backend: Backend, model: bytearray) -> None:
        data = self.data[: max(len(model) - self.offset, 0)]
        backend.write(self.offset, data)
        model[self.offset : self.offset + len(data)] = data

    def __repr__(self) -> str:
        return f"Write({self.offset}, {len(self.data)} bytes)"


class Clear(Op):
    """trim (``how="trim"``) or zero with or without ``may_trim``."""

    def __init__(self, how: str, offset: int, length: int) -> None:
        self.how, self.offset, self.length = how, offset, length

    def apply(self, backend: Backend, model: bytearray) -> None:
        length = min(self.length, max(len(model) - self.offset, 0))
        if self.how == "trim":
            backend.trim(self.offset, length)
        else:
            backend.zero(self.offset, length, may_trim=self.how == "zero+trim", fast_only=False)
        model[self.offset : self.offset + length] = bytes(length)

    def __repr__(self) -> str:
        return f"Clear({self.how!r}, {self.offset}, {self.length})"


class Grow(Op):
    def __init__(self, extra: int) -> None:
        self.extra = extra

    def apply(self, backend: Backend, model: bytearray) -> None:
        backend.resize(len(model) + self.extra)
        model.extend(bytes(self.extra))

    def __repr__(self) -> str:
        return f"Grow({self.extra})"


def _offsets() -> st.SearchStrategy[int]:
    # Bias towards page boundaries, where page-based backends split requests.
    near_page = st.builds(lambda p, d: max(p * 4096 + d, 0), st.integers(0, 10), st.integers(-3, 3))
    return st.one_of(near_page, st.integers(0, MODEL_SIZE - 1))


def _operations() -> st.SearchStrategy[Op]:
    write = st.builds(Write, _offsets(), st.binary(min_size=1, max_size=3 * 4096 + 7))
    clear = st.builds(
        Clear,
        st.sampled_from(["trim", "zero", "zero+trim"]),
        _offsets(),
        st.integers(1, 3 * 4096 + 7),
    )
    grow = st.builds(Grow, st.sampled_from([512, 4096, 5000]))
    return st.one_of(write, write, clear, grow)


@settings(max_examples=60, deadline=None)
@given(ops=st.lists(_operations(), min_size=1, max_size=12))
def check_against_model(make: BackendFactory, ops: list[Op]) -> None:
    """Random writes, trims, zeroes and grows: the backend always reads like the model."""
    backend = make(MODEL_SIZE)
    model = bytearray(MODEL_SIZE)
    try:
        for op in ops:
            op.apply(backend, model)
            assert backend.size == len(model)
            assert backend.read(0, len(model)) == model, op
        assert_extents_match_data(backend, 0, len(model))
    finally:
        backend.close()


class BackendConformance:
    """Tests every backend must pass; subclasses provide the ``make`` fixture."""

    @pytest.fixture
    def make(self) -> BackendFactory:
        raise NotImplementedError("subclasses provide a backend factory")

    @pytest.fixture
    def backend(self, make: BackendFactory) -> Backend:
        return make(SIZE)

    # -- reads and writes ---------------------------------------------------------

    def test_size_is_the_requested_size(self, backend: Backend) -> None:
        assert backend.size == SIZE

    def test_unwritten_reads_are_zero(self, backend: Backend) -> None:
        assert backend.read(0, SIZE) == bytes(SIZE)
        assert backend.read(4095, 3) == bytes(3)

    @pytest.mark.parametrize("offset", [0, 1, 511, 4095, 4097, 65535, SIZE - 8193])
    @pytest.mark.parametrize("length", [1, 512, 4096, 8193])
    def test_roundtrip_at_unaligned_offsets(
        self, backend: Backend, offset: int, length: int
    ) -> None:
        data = os.urandom(length)
        backend.write(offset, data)
        assert backend.read(offset, length) == data
        before, after = max(offset - 7, 0), offset + length
        assert backend.read(before, offset - before) == bytes(offset - before)
        assert backend.read(after, 7) == bytes(7)

    def test_write_accepts_bytearray_and_memoryview(self, backend: Backend) -> None:
        backend.write(10, bytearray(b"abc"))
        backend.write(13, memoryview(b"xxdefxx")[2:5])
        assert backend.read(10, 6) == b"abcdef"

    def test_overwrite_replaces_only_the_written_bytes(self, backend: Backend) -> None:
        backend.write(4090, b"A" * 20)
        backend.write(4095, b"BB")
        assert backend.read(4090, 20) == b"AAAAABB" + b"A" * 13

    def test_write_at_the_last_byte(self, backend: Backend) -> None:
        backend.write(SIZE - 1, b"\xff")
        assert backend.read(SIZE - 2, 2) == b"\x00\xff"

    @pytest.mark.parametrize(("offset", "length"), [(0, 100), (4000, 9000), (SIZE - 10, 10)])
    def test_read_slice_sends_what_read_returns(
        self, backend: Backend, offset: int, length: int
    ) -> None:
        backend.write(4090, os.urandom(5000))
        backend.write(SIZE - 5, b"12345")
        piece = backend.read_slice(offset, length)
        assert slice_bytes(piece) == backend.read(offset, length)

    def test_large_write_roundtrip(self, make: BackendFactory) -> None:
        backend = make(16 * MiB)
        data = os.urandom(9 * MiB + 123)
        backend.write(3 * MiB - 7, data)
        assert backend.read(3 * MiB - 7, len(data)) == data
        assert backend.read(0, 3 * MiB - 7) == bytes(3 * MiB - 7)

    # -- trim and zero --------------------------------------------------------------

    def test_trim_reads_zero_and_shows_a_hole(self, backend: Backend) -> None:
        backend.write(0, b"\xaa" * (192 * KiB))
        backend.trim(64 * KiB, 64 * KiB)
        assert backend.read(64 * KiB, 64 * KiB) == bytes(64 * KiB)
        assert backend.read(0, 64 * KiB) == b"\xaa" * (64 * KiB)
        assert backend.read(128 * KiB, 64 * KiB) == b"\xaa" * (64 * KiB)
        assert backend.extents(64 * KiB, 64 * KiB) == [
            Extent(64 * KiB, 64 * KiB, hole=True, zero=True)
        ]

    def test_unaligned_trim_reads_zero_and_keeps_neighbours(self, backend: Backend) -> None:
        backend.write(0, b"\x55" * 20000)
        backend.trim(1000, 9000)
        assert backend.read(0, 20000) == b"\x55" * 1000 + bytes(9000) + b"\x55" * 10000

    @pytest.mark.parametrize("may_trim", [False, True])
    @pytest.mark.parametrize(("offset", "length"), [(0, 64 * KiB), (1000, 9000), (4096, 1)])
    def test_zero_reads_zero(
        self, backend: Backend, may_trim: bool, offset: int, length: int
    ) -> None:
        backend.write(0, b"\x77" * (80 * KiB))
        backend.zero(offset, length, may_trim=may_trim, fast_only=False)
        assert backend.read(offset, length) == bytes(length)
        assert backend.read(offset + length, 10) == b"\x77" * 10
        assert_extents_match_data(backend, 0, 80 * KiB)

    @pytest.mark.parametrize("may_trim", [False, True])
    def test_fast_zero_zeroes_or_refuses_without_damage(
        self, backend: Backend, may_trim: bool
    ) -> None:
        backend.write(0, b"\x33" * (64 * KiB))
        try:
            backend.zero(4 * KiB, 32 * KiB, may_trim=may_trim, fast_only=True)
        except NotSupported:
            assert backend.read(4 * KiB, 32 * KiB) in (b"\x33" * (32 * KiB), bytes(32 * KiB))
        else:
            assert backend.read(4 * KiB, 32 * KiB) == bytes(32 * KiB)
        assert backend.read(0, 4 * KiB) == b"\x33" * (4 * KiB)
        assert backend.read(36 * KiB, 28 * KiB) == b"\x33" * (28 * KiB)

    def test_zero_length_trim_and_zero_change_nothing(self, backend: Backend) -> None:
        backend.write(0, b"\x11" * 100)
        backend.trim(50, 0)
        backend.zero(50, 0, may_trim=True, fast_only=False)
        assert backend.read(0, 100) == b"\x11" * 100

    # -- extents -------------------------------------------------------------------

    def test_extents_of_an_empty_backend_are_one_hole(self, backend: Backend) -> None:
        assert check_extents(backend, 0, SIZE) == [Extent(0, SIZE, hole=True, zero=True)]

    def test_written_data_is_never_reported_as_zero(self, backend: Backend) -> None:
        backend.write(100 * KiB, b"\x01" * (8 * KiB))
        extents = check_extents(backend, 0, SIZE)
        data = [e for e in extents if e.offset < 108 * KiB and e.end > 100 * KiB]
        assert data
        assert all(not e.zero and not e.hole for e in data)

    @pytest.mark.parametrize(
        ("offset", "length"), [(0, SIZE), (1, 100), (99 * KiB, 10 * KiB), (SIZE - 1, 1)]
    )
    def test_extents_cover_the_requested_range(
        self, backend: Backend, offset: int, length: int
    ) -> None:
        backend.write(64 * KiB, b"x" * (64 * KiB))
        backend.write(512 * KiB, b"y" * 4096)
        assert_extents_match_data(backend, offset, length)

    def test_extents_are_clipped_to_the_size(self, backend: Backend) -> None:
        backend.write(SIZE - 4096, b"z" * 4096)
        extents = check_extents(backend, SIZE - 8192, 1 * MiB)
        assert extents[-1].end == SIZE

    def test_extents_are_merged(self, backend: Backend) -> None:
        for page in range(16):
            backend.write(page * 4096, b"d" * 4096)
        assert check_extents(backend, 0, 64 * KiB) == [Extent(0, 64 * KiB, hole=False, zero=False)]

    # -- resize, flush, cache ------------------------------------------------------------

    def test_grow_shows_zeroes_at_the_tail(self, backend: Backend) -> None:
        backend.write(SIZE - 10, b"t" * 10)
        backend.resize(2 * SIZE)
        assert backend.size == 2 * SIZE
        assert backend.read(SIZE - 10, 10) == b"t" * 10
        assert backend.read(SIZE, SIZE) == bytes(SIZE)
        assert_extents_match_data(backend, 0, 2 * SIZE)

    def test_shrink_then_grow_does_not_bring_old_data_back(self, backend: Backend) -> None:
        backend.write(SIZE - 8192, b"s" * 8192)
        backend.resize(SIZE - 4096)
        backend.resize(SIZE)
        assert backend.read(SIZE - 8192, 8192) == b"s" * 4096 + bytes(4096)

    def test_flush_succeeds_and_keeps_data(self, backend: Backend) -> None:
        backend.write(0, b"durable")
        backend.flush()
        assert backend.read(0, 7) == b"durable"

    def test_cache_is_harmless(self, backend: Backend) -> None:
        backend.write(0, b"c" * 10)
        backend.cache(0, SIZE)
        assert backend.read(0, 10) == b"c" * 10

    # -- model-based -------------------------------------------------------------------

    def test_matches_a_bytearray_model(self, make: BackendFactory) -> None:
        check_against_model(make)
