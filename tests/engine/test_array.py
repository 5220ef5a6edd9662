"""The LUN registry: management operations, persistence and the data-directory lock."""

from __future__ import annotations

import logging
import os
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import LUN_DIR, Array
from lunseal.engine.backends.file import FileBackend
from lunseal.engine.backends.identity import CATALOG_FILE
from lunseal.errors import Conflict, DataDirLocked, InvalidArgument, LunsealError, NotFound

MiB = 1 << 20


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


class Arrays:
    """Opens arrays on one data directory and closes whatever a test left open."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.open_ones: list[Array] = []

    def open(self) -> Array:
        arr = Array.open(self.data_dir)
        self.open_ones.append(arr)
        return arr

    def close(self, arr: Array) -> None:
        self.open_ones.remove(arr)
        arr.close()

    def reopen(self, arr: Array) -> Array:
        self.close(arr)
        return self.open()


@pytest.fixture
def arrays(data_dir: Path) -> Iterator[Arrays]:
    tracker = Arrays(data_dir)
    yield tracker
    for arr in tracker.open_ones:
        arr.close()


@pytest.fixture
def array(arrays: Arrays) -> Array:
    return arrays.open()


class User:
    """An attached consumer, as an NBD connection would be."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def revoke(self, reason: str) -> None:
        self.reasons.append(reason)


# -- create, list, show ----------------------------------------------------------------


def test_create_makes_a_sparse_owned_backing_file(array: Array) -> None:
    lun = array.create_lun("db", 8 * MiB)
    path = Path(lun.record.path)
    assert path.parent == array.data_dir / LUN_DIR
    assert path.stat().st_size == 8 * MiB
    assert path.stat().st_mode & 0o777 == 0o600
    assert (lun.size, lun.record.number, lun.record.owned) == (8 * MiB, 0, True)
    assert lun.record.backend == "file"
    assert array.lun("db") is lun


def test_list_is_ordered_by_number(array: Array) -> None:
    array.create_lun("b", MiB, number=7)
    array.create_lun("a", MiB, number=3)
    array.create_lun("c", MiB)
    assert [(lun.name, lun.record.number) for lun in array.luns()] == [
        ("c", 0),
        ("a", 3),
        ("b", 7),
    ]


def test_unknown_lun_is_not_found(array: Array) -> None:
    with pytest.raises(NotFound):
        array.lun("nope")
    assert array.find("nope") is None


def test_default_lun_is_number_zero(array: Array) -> None:
    assert array.default_lun() is None
    array.create_lun("one", MiB, number=1)
    assert array.default_lun() is None
    zero = array.create_lun("zero", MiB)
    assert array.default_lun() is zero


def test_duplicate_name_is_a_conflict(array: Array) -> None:
    array.create_lun("db", MiB)
    with pytest.raises(Conflict):
        array.create_lun("db", 2 * MiB)
    assert array.lun("db").size == MiB
    assert len(os.listdir(array.data_dir / LUN_DIR)) == 1


def test_duplicate_number_is_a_conflict(array: Array) -> None:
    array.create_lun("a", MiB, number=5)
    with pytest.raises(Conflict):
        array.create_lun("b", MiB, number=5)
    assert array.find("b") is None
    assert len(os.listdir(array.data_dir / LUN_DIR)) == 1


@pytest.mark.parametrize("number", [-1, 16384])
def test_invalid_number_is_refused(array: Array, number: int) -> None:
    with pytest.raises(InvalidArgument):
        array.create_lun("a", MiB, number=number)


def test_the_lowest_free_number_is_chosen(array: Array) -> None:
    for name in "abc":
        array.create_lun(name, MiB)
    array.delete_lun("b")
    assert array.create_lun("d", MiB).record.number == 1
    array.create_lun("e", MiB, number=4)
    assert array.create_lun("f", MiB).record.number == 3
    assert array.create_lun("g", MiB).record.number == 5


@pytest.mark.parametrize(("name", "size"), [("../x", MiB), ("a/b", MiB), ("ok", 1000), ("ok", 0)])
def test_invalid_name_or_size_creates_nothing(array: Array, name: str, size: int) -> None:
    with pytest.raises(InvalidArgument):
        array.create_lun(name, size)
    assert array.luns() == []
    assert os.listdir(array.data_dir / LUN_DIR) == []


def test_size_is_required_without_a_file(array: Array) -> None:
    with pytest.raises(InvalidArgument, match="size is required"):
        array.create_lun("a", None)


# -- grow, read-only, delete --------------------------------------------------------------


def test_grow_changes_the_file_and_the_catalog(array: Array) -> None:
    lun = array.create_lun("a", MiB)
    array.grow_lun("a", 3 * MiB)
    assert lun.size == 3 * MiB
    assert Path(lun.record.path).stat().st_size == 3 * MiB
    assert array.catalog.luns()[0].size == 3 * MiB


@pytest.mark.parametrize("size", [MiB, MiB // 2, MiB + 100])
def test_grow_refuses_smaller_equal_or_unaligned(array: Array, size: int) -> None:
    array.create_lun("a", MiB)
    with pytest.raises(InvalidArgument):
        array.grow_lun("a", size)
    assert array.catalog.luns()[0].size == MiB


def test_grow_unknown_lun_is_not_found(array: Array) -> None:
    with pytest.raises(NotFound):
        array.grow_lun("nope", 2 * MiB)


def test_set_read_only_is_recorded(array: Array) -> None:
    array.create_lun("a", MiB)
    assert array.set_read_only("a", True).read_only
    assert array.catalog.luns()[0].read_only
    assert not array.set_read_only("a", False).read_only


def test_delete_removes_the_lun_and_its_owned_file(array: Array) -> None:
    path = Path(array.create_lun("a", MiB).record.path)
    array.delete_lun("a")
    assert array.find("a") is None
    assert array.catalog.luns() == []
    assert not path.exists()


def test_delete_unknown_lun_is_not_found(array: Array) -> None:
    with pytest.raises(NotFound):
        array.delete_lun("nope")


def test_delete_is_refused_while_a_user_is_attached(array: Array) -> None:
    lun = array.create_lun("a", MiB)
    user = User()
    lun.users.add(user)
    with pytest.raises(Conflict, match="in use"):
        array.delete_lun("a")
    assert array.lun("a") is lun
    assert user.reasons == []
    assert Path(lun.record.path).exists()


def test_forced_delete_revokes_the_users(array: Array) -> None:
    lun = array.create_lun("a", MiB)
    users = [User(), User()]
    lun.users.update(users)
    array.delete_lun("a", force=True)
    assert all(len(u.reasons) == 1 and "deleted" in u.reasons[0] for u in users)
    assert array.find("a") is None


def test_a_deleted_name_can_be_reused_with_a_new_identity(array: Array) -> None:
    old = array.create_lun("a", MiB)
    old.write(0, b"old data")
    array.delete_lun("a")
    new = array.create_lun("a", MiB)
    assert new.record.uuid != old.record.uuid
    assert new.read(0, 8) == bytes(8)


# -- external backing files -----------------------------------------------------------------


def test_existing_file_is_adopted_and_kept_on_delete(array: Array, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(b"boot" + bytes(MiB - 4))
    lun = array.create_lun("ext", None, path=path)
    assert (lun.size, lun.record.owned, lun.record.path) == (MiB, False, str(path))
    assert lun.read(0, 4) == b"boot"
    array.delete_lun("ext")
    assert path.read_bytes()[:4] == b"boot"


def test_existing_file_with_matching_size_is_accepted(array: Array, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    assert array.create_lun("ext", MiB, path=path).size == MiB


def test_existing_file_size_mismatch_is_refused(array: Array, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    with pytest.raises(InvalidArgument, match="not 2097152"):
        array.create_lun("ext", 2 * MiB, path=path)
    assert array.luns() == []
    assert path.stat().st_size == MiB


@pytest.mark.parametrize("length", [0, 1000])
def test_existing_file_of_unusable_size_is_refused(
    array: Array, tmp_path: Path, length: int
) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(length))
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(InvalidArgument):
        array.create_lun("ext", None, path=path)
    assert len(os.listdir("/proc/self/fd")) == fds_before, "the file was left open"
    assert path.stat().st_size == length


def test_new_external_file_is_created_and_owned(array: Array, tmp_path: Path) -> None:
    path = tmp_path / "new.img"
    lun = array.create_lun("ext", MiB, path=path)
    assert lun.record.owned
    assert path.stat().st_size == MiB
    array.delete_lun("ext")
    assert not path.exists()


def test_missing_external_file_needs_a_size(array: Array, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="does not exist"):
        array.create_lun("ext", None, path=tmp_path / "missing.img")


def test_relative_path_is_refused(array: Array) -> None:
    with pytest.raises(InvalidArgument, match="absolute"):
        array.create_lun("ext", MiB, path=Path("disk.img"))


def test_a_directory_is_not_a_backing_file(array: Array, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="not a regular file"):
        array.create_lun("ext", None, path=tmp_path)


def test_one_file_cannot_back_two_luns(array: Array, tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    path.write_bytes(bytes(MiB))
    array.create_lun("one", None, path=path)
    with pytest.raises(Conflict):
        array.create_lun("two", None, path=path)


# -- persistence and the lock -----------------------------------------------------------------


def test_luns_survive_close_and_reopen(arrays: Arrays, array: Array) -> None:
    lun = array.create_lun("a", MiB, number=9, read_only=True)
    array.create_lun("b", 2 * MiB).write(512, b"persisted")
    array.grow_lun("b", 4 * MiB)
    before = (lun.record, array.array_id)
    again = arrays.reopen(array)
    assert (again.lun("a").record, again.array_id) == before
    assert again.lun("b").size == 4 * MiB
    assert again.lun("b").read(512, 9) == b"persisted"


def test_deletion_survives_reopen(arrays: Arrays, array: Array) -> None:
    array.create_lun("a", MiB)
    array.delete_lun("a")
    assert arrays.reopen(array).luns() == []


def test_a_second_open_is_refused(array: Array) -> None:
    with pytest.raises(DataDirLocked):
        Array.open(array.data_dir)
    array.create_lun("still-usable", MiB)


def test_the_lock_is_released_on_close(arrays: Arrays, array: Array) -> None:
    arrays.close(array)
    arrays.open()


def test_a_fresh_array_reports_a_clean_last_shutdown(array: Array) -> None:
    assert array.last_shutdown_clean
    assert array.array_id


def test_close_records_a_clean_shutdown(arrays: Arrays, array: Array) -> None:
    assert arrays.reopen(array).last_shutdown_clean


CRASH = """
import os, pathlib, sys
from lunseal.engine.array import Array
Array.open(pathlib.Path(sys.argv[1]))
os._exit(0)
"""


def test_a_crash_is_recorded_as_an_unclean_shutdown(arrays: Arrays, data_dir: Path) -> None:
    arrays.close(arrays.open())
    subprocess.run([sys.executable, "-c", CRASH, str(data_dir)], check=True, timeout=30)
    assert not arrays.open().last_shutdown_clean


def test_a_file_shrunk_while_down_is_served_at_the_recorded_size(
    arrays: Arrays, array: Array, caplog: pytest.LogCaptureFixture
) -> None:
    lun = array.create_lun("a", 2 * MiB)
    lun.write(MiB, b"\x01" * 512)
    arrays.close(array)
    os.truncate(lun.record.path, MiB)
    with caplog.at_level(logging.WARNING):
        again = arrays.open()
    assert again.lun("a").size == 2 * MiB
    assert again.lun("a").read(MiB, 512) == bytes(512)
    assert "catalog says" in caplog.text


def test_a_failed_flush_at_close_is_recorded_as_unclean(arrays: Arrays, array: Array) -> None:
    lun = array.create_lun("a", MiB)
    lun._backend.close()
    lun._backend = FileBackend(Path("/dev/full"))  # fdatasync fails on it for real
    assert not arrays.reopen(array).last_shutdown_clean


def test_a_failed_open_releases_the_data_directory(arrays: Arrays, array: Array) -> None:
    arrays.close(array)
    db = sqlite3.connect(arrays.data_dir / CATALOG_FILE)
    db.execute("PRAGMA user_version = 999")
    db.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LunsealError, match="upgrade lunseal"):
        arrays.open()
    assert len(os.listdir("/proc/self/fd")) == fds_before
