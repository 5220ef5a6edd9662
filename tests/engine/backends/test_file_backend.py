"""What only the sparse-file backend does: persistence, sparseness and real I/O errors.

Failures come from real devices, not mocks: ``/dev/full`` refuses every write
with ENOSPC and cannot be synced or truncated.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.backends.file import FileBackend
from lunseal.engine.lun import Lun, LunRecord
from lunseal.errors import BackendError

DEV_FULL = Path("/dev/full")


@pytest.fixture
def full() -> Iterator[FileBackend]:
    if not os.access(DEV_FULL, os.R_OK | os.W_OK):
        pytest.skip("/dev/full is not available")
    backend = FileBackend(DEV_FULL)
    yield backend
    backend.close()


def test_new_files_are_sparse_and_persistent(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    backend = FileBackend(path, create_size=1 << 30)
    backend.write(4096, b"kept")
    backend.flush()
    backend.close()
    assert path.stat().st_size == 1 << 30
    assert path.stat().st_blocks * 512 < 1 << 20
    reopened = FileBackend(path)
    try:
        assert (reopened.size, reopened.read(4096, 4)) == (1 << 30, b"kept")
    finally:
        reopened.close()


def test_creating_never_overwrites_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    path.write_bytes(b"precious")
    with pytest.raises(BackendError, match="cannot open backing file"):
        FileBackend(path, create_size=4096)
    assert path.read_bytes() == b"precious"


def test_opening_a_missing_file_is_a_backend_error(tmp_path: Path) -> None:
    with pytest.raises(BackendError, match="cannot open backing file"):
        FileBackend(tmp_path / "missing.img")


def test_a_file_shortened_behind_its_back_reads_as_zeroes(tmp_path: Path) -> None:
    path = tmp_path / "lun.img"
    backend = FileBackend(path, create_size=8192)
    try:
        backend.write(0, b"\x01" * 8192)
        os.truncate(path, 4096)
        assert backend.read(0, 8192) == b"\x01" * 4096 + bytes(4096)
    finally:
        backend.close()


def test_close_is_idempotent(tmp_path: Path) -> None:
    backend = FileBackend(tmp_path / "lun.img", create_size=4096)
    backend.close()
    backend.close()


def test_disk_full_stays_enospc(full: FileBackend) -> None:
    with pytest.raises(BackendError, match="write failed on /dev/full") as info:
        full.write(0, b"x")
    assert info.value.nbd_errno == errno.ENOSPC


def test_a_failed_flush_is_a_backend_error(full: FileBackend) -> None:
    with pytest.raises(BackendError, match="flush failed") as info:
        full.flush()
    assert info.value.nbd_errno == errno.EIO


def test_a_failed_resize_keeps_the_old_size(full: FileBackend) -> None:
    with pytest.raises(BackendError, match="resize failed"):
        full.resize(4096)
    assert full.size == 0


def test_a_lun_passes_backend_errors_through(full: FileBackend) -> None:
    record = LunRecord("u", "full", 0, 4096, "file", str(DEV_FULL), False, False, 0.0)
    lun = Lun(record, full)
    with pytest.raises(BackendError) as info:
        lun.write(0, b"data", fua=True)
    assert info.value.nbd_errno == errno.ENOSPC
    assert lun.read(0, 4) == bytes(4)
