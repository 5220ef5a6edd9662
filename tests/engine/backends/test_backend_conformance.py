"""Run the backend conformance kit against every backend lunseal has."""

from __future__ import annotations

import itertools
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.backends.base import Backend, Extent, merge_extents
from lunseal.engine.backends.file import FileBackend
from lunseal.engine.backends.memory import MemoryBackend
from tests.engine.backends.backend_conformance import BackendConformance, BackendFactory

SHM = Path("/dev/shm")


class TestFileBackend(BackendConformance):
    @pytest.fixture
    def make(self, tmp_path: Path) -> Iterator[BackendFactory]:
        counter = itertools.count()
        made: list[Backend] = []

        def factory(size: int) -> Backend:
            backend = FileBackend(tmp_path / f"lun-{next(counter)}.img", create_size=size)
            made.append(backend)
            return backend

        yield factory
        for backend in made:
            backend.close()


class TestFileBackendOnTmpfs(TestFileBackend):
    """tmpfs punches holes but has no ZERO_RANGE: the slow-zero and fast_only paths."""

    @pytest.fixture
    def tmp_path(self) -> Iterator[Path]:
        if not SHM.is_dir():
            pytest.skip(f"{SHM} is not available")
        path = Path(tempfile.mkdtemp(prefix="lunseal-test-", dir=SHM))
        yield path
        shutil.rmtree(path)


class TestMemoryBackend(BackendConformance):
    @pytest.fixture
    def make(self) -> BackendFactory:
        return MemoryBackend


def hole(offset: int, length: int) -> Extent:
    return Extent(offset, length, hole=True, zero=True)


def data(offset: int, length: int) -> Extent:
    return Extent(offset, length, hole=False, zero=False)


@pytest.mark.parametrize(
    ("pieces", "merged"),
    [
        ([], []),
        ([data(0, 0)], []),
        ([data(0, 5), data(5, 5)], [data(0, 10)]),
        ([hole(0, 5), data(5, 0), hole(5, 5)], [hole(0, 10)]),
        ([data(0, 5), hole(5, 5), data(10, 5)], [data(0, 5), hole(5, 5), data(10, 5)]),
        ([data(0, 5), data(6, 5)], [data(0, 5), data(6, 5)]),
        ([Extent(0, 5, False, True), data(5, 5)], [Extent(0, 5, False, True), data(5, 5)]),
    ],
    ids=["empty", "zero-length", "join", "join-across-empty", "alternate", "gap", "flags"],
)
def test_merge_extents(pieces: list[Extent], merged: list[Extent]) -> None:
    assert merge_extents(pieces) == merged
