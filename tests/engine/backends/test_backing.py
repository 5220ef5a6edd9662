"""Backing-file identity, locks and unavailable LUNs (issue "close every path to a
false intact", items 1 and 8), with real files, links and arrays."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import CATALOG_FILE, LUN_DIR, Array
from lunseal.errors import Conflict, InvalidArgument, LunsealError, LunUnavailable

MiB = 1 << 20


class Opened:
    """Arrays a test opened, closed at the end whatever happened."""

    def __init__(self) -> None:
        self.arrays: list[Array] = []

    def open(self, data_dir: Path) -> Array:
        arr = Array.open(data_dir)
        self.arrays.append(arr)
        return arr

    def close(self, arr: Array) -> None:
        self.arrays.remove(arr)
        arr.close()


@pytest.fixture(autouse=True)
def lock_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    registry = tmp_path / "lock-registry"
    monkeypatch.setenv("LUNSEAL_LOCK_REGISTRY", str(registry))
    return registry


@pytest.fixture
def opened() -> Iterator[Opened]:
    o = Opened()
    yield o
    for arr in list(o.arrays):
        arr.close()


@pytest.fixture
def array(opened: Opened, tmp_path: Path) -> Array:
    return opened.open(tmp_path / "data")


@pytest.fixture
def files(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    d.mkdir()
    return d


def disk(path: Path, size: int = MiB) -> Path:
    path.write_bytes(bytes(size))
    return path


# -- item 1: one file never backs two LUNs ----------------------------------------------------


def test_a_dotdot_alias_of_a_used_file_is_refused(array: Array, files: Path) -> None:
    disk(files / "a.img")
    (files / "sub").mkdir()
    array.create_lun("a", None, path=files / "a.img")
    with pytest.raises(Conflict, match="same file as the backing file of LUN a"):
        array.create_lun("b", None, path=files / "sub" / ".." / "a.img")
    assert array.find("b") is None


def test_a_symlink_is_refused(array: Array, files: Path) -> None:
    disk(files / "a.img")
    (files / "link.img").symlink_to(files / "a.img")
    with pytest.raises(InvalidArgument, match="symbolic link"):
        array.create_lun("b", None, path=files / "link.img")
    assert array.find("b") is None


def test_a_file_reached_through_a_symlinked_directory_is_the_same_file(
    array: Array, files: Path, tmp_path: Path
) -> None:
    disk(files / "a.img")
    array.create_lun("a", None, path=files / "a.img")
    (tmp_path / "alias").symlink_to(files)
    with pytest.raises(Conflict, match="LUN a"):
        array.create_lun("b", None, path=tmp_path / "alias" / "a.img")


def test_a_hard_link_of_a_used_file_is_refused(array: Array, files: Path) -> None:
    disk(files / "a.img")
    os.link(files / "a.img", files / "hard.img")
    array.create_lun("a", None, path=files / "a.img")
    with pytest.raises(Conflict, match="same file"):
        array.create_lun("b", None, path=files / "hard.img")


def test_a_hard_link_of_an_owned_lun_file_is_refused(array: Array, files: Path) -> None:
    owned = array.create_lun("a", MiB)
    os.link(owned.record.path, files / "hard.img")
    with pytest.raises(Conflict, match="same file"):
        array.create_lun("b", None, path=files / "hard.img")


def test_another_arrays_lun_file_is_refused(opened: Opened, array: Array, tmp_path: Path) -> None:
    other = opened.open(tmp_path / "other")
    theirs = Path(other.create_lun("x", MiB).record.path)
    with pytest.raises(InvalidArgument, match="inside the lunseal data directory"):
        array.create_lun("stolen", None, path=theirs)
    opened.close(other)  # not running any more: still its file
    with pytest.raises(InvalidArgument, match=str(tmp_path / "other")):
        array.create_lun("stolen", None, path=theirs)


def test_a_hard_link_of_a_running_arrays_lun_file_is_refused_by_its_lock(
    opened: Opened, array: Array, tmp_path: Path, files: Path
) -> None:
    other = opened.open(tmp_path / "other")
    theirs = Path(other.create_lun("x", MiB).record.path)
    os.link(theirs, files / "hard.img")
    with pytest.raises(Conflict, match=f"locked by the lunseal array in {tmp_path / 'other'}"):
        array.create_lun("stolen", None, path=files / "hard.img")


@pytest.mark.parametrize("name", [CATALOG_FILE, "lock", "api-token", f"{LUN_DIR}/new.img"])
def test_files_inside_the_own_data_directory_are_refused(array: Array, name: str) -> None:
    target = array.data_dir / name
    with pytest.raises(InvalidArgument, match="inside the lunseal data directory"):
        array.create_lun("evil", MiB if not target.exists() else None, path=target)
    assert array.find("evil") is None


def test_a_new_file_is_never_created_inside_a_data_directory(array: Array, tmp_path: Path) -> None:
    (array.data_dir / "sub").mkdir()
    with pytest.raises(InvalidArgument, match="inside the lunseal data directory"):
        array.create_lun("evil", MiB, path=array.data_dir / "sub" / "new.img")
    assert not (array.data_dir / "sub" / "new.img").exists()


def test_a_new_file_needs_an_existing_directory(array: Array, tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="cannot be used"):
        array.create_lun("new", MiB, path=tmp_path / "nodir" / "new.img")


def test_the_stored_path_is_canonical(array: Array, files: Path, tmp_path: Path) -> None:
    (tmp_path / "alias").symlink_to(files)
    lun = array.create_lun("a", MiB, path=tmp_path / "alias" / "." / "a.img")
    assert lun.record.path == str(files / "a.img")


# -- locks: a second array (or daemon) cannot serve the same file ---------------------------------


def test_a_second_array_cannot_use_a_file_in_use(
    opened: Opened, array: Array, tmp_path: Path, files: Path
) -> None:
    disk(files / "shared.img")
    array.create_lun("mine", None, path=files / "shared.img")
    second = opened.open(tmp_path / "second")
    with pytest.raises(Conflict) as refused:
        second.create_lun("theirs", None, path=files / "shared.img")
    message = refused.value.message
    assert str(array.data_dir) in message
    assert f"pid {os.getpid()}" in message
    assert "LUN mine" in message
    assert second.find("theirs") is None
    # Once the first array lets go, the second may use it.
    array.delete_lun("mine")
    assert second.create_lun("theirs", None, path=files / "shared.img").size == MiB


def test_the_lock_lasts_until_close(
    opened: Opened, array: Array, tmp_path: Path, files: Path
) -> None:
    disk(files / "shared.img")
    array.create_lun("mine", None, path=files / "shared.img")
    second = opened.open(tmp_path / "second")
    with pytest.raises(Conflict, match="locked by"):
        second.create_lun("theirs", None, path=files / "shared.img")
    opened.close(array)
    assert second.create_lun("theirs", None, path=files / "shared.img").size == MiB


def test_a_lock_taken_by_another_program_is_reported_without_a_name(
    array: Array, files: Path
) -> None:
    import fcntl
    import struct

    disk(files / "held.img")
    fd = os.open(files / "held.img", os.O_RDWR)
    try:
        fcntl.fcntl(fd, 37, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 0, 0))
        with pytest.raises(Conflict, match="locked by another process"):
            array.create_lun("h", None, path=files / "held.img")
    finally:
        os.close(fd)
    assert array.create_lun("h", None, path=files / "held.img").size == MiB


# -- item 8: a missing or refused backing file makes one LUN unavailable --------------------------


def test_a_missing_backing_file_leaves_the_other_luns_serving(
    opened: Opened, array: Array, files: Path
) -> None:
    good = array.create_lun("good", MiB)
    good.write(0, b"kept")
    array.create_lun("ext", None, path=disk(files / "ext.img"))
    opened.close(array)
    (files / "ext.img").rename(files / "moved.img")

    arr = opened.open(array.data_dir)
    ext = arr.lun("ext")
    assert not ext.available
    assert "does not exist" in ext.unavailable
    assert arr.lun("good").read(0, 4) == b"kept"
    for call in (
        lambda: arr.tracker("ext"),
        lambda: arr.grow_lun("ext", 2 * MiB),
        lambda: ext.read(0, 512),
    ):
        with pytest.raises(LunUnavailable, match="LUN ext is unavailable"):
            call()
    # A clean shutdown with an unavailable LUN is still clean, and it stays listed.
    opened.close(arr)
    again = opened.open(array.data_dir)
    assert again.last_shutdown_clean
    assert not again.lun("ext").available


def test_an_unavailable_lun_can_be_deleted(opened: Opened, array: Array, files: Path) -> None:
    array.create_lun("ext", None, path=disk(files / "ext.img"))
    owned = Path(array.create_lun("own", MiB).record.path)
    opened.close(array)
    (files / "ext.img").unlink()
    owned.rename(files / "own-moved.img")
    arr = opened.open(array.data_dir)
    arr.delete_lun("ext")
    arr.delete_lun("own")
    assert arr.luns() == []
    opened.close(arr)
    assert opened.open(array.data_dir).luns() == []


def test_a_file_locked_elsewhere_at_start_up_makes_the_lun_unavailable(
    opened: Opened, tmp_path: Path, files: Path
) -> None:
    disk(files / "shared.img")
    first = opened.open(tmp_path / "first")
    first.create_lun("a", None, path=files / "shared.img")
    opened.close(first)
    squatter = opened.open(tmp_path / "squatter")
    squatter.create_lun("s", None, path=files / "shared.img")

    first = opened.open(tmp_path / "first")
    lun = first.lun("a")
    assert not lun.available
    assert str(tmp_path / "squatter") in lun.unavailable
    # Once the squatter lets go, re-pointing at the very same file brings it back.
    squatter.delete_lun("s")
    assert first.repoint_lun("a", files / "shared.img").available


def test_a_legacy_record_pointing_into_a_data_directory_is_unavailable(
    opened: Opened, array: Array, tmp_path: Path
) -> None:
    other = opened.open(tmp_path / "other")
    theirs = Path(other.create_lun("x", MiB).record.path)
    opened.close(other)
    rec = array.create_lun("victim", MiB).record
    opened.close(array)
    # As an older release could have recorded it (it compared paths as strings).
    arr = opened.open(array.data_dir)
    arr.catalog._db.execute("UPDATE luns SET path = ? WHERE uuid = ?", (str(theirs), rec.uuid))
    opened.close(arr)
    arr = opened.open(array.data_dir)
    assert "inside the lunseal data directory" in arr.lun("victim").unavailable


def test_two_records_on_one_file_leave_the_second_unavailable(
    opened: Opened, array: Array, files: Path
) -> None:
    disk(files / "a.img")
    array.create_lun("a", None, path=files / "a.img")
    rec = array.create_lun("b", None, path=disk(files / "b.img")).record
    array.catalog._db.execute(
        "UPDATE luns SET path = ? WHERE uuid = ?", (str(files / "a.img"), rec.uuid)
    )
    opened.close(array)
    arr = opened.open(array.data_dir)
    assert arr.lun("a").available
    assert "same file as the backing file of LUN a" in arr.lun("b").unavailable


# -- re-point ----------------------------------------------------------------------------


def test_repoint_changes_the_state_token(opened: Opened, array: Array, files: Path) -> None:
    array.create_lun("ext", None, path=disk(files / "ext.img"))
    _, before = array.tracker("ext").acquire("backup")
    opened.close(array)
    # Same bytes, another file: nothing proves it is the copy the token described.
    shutil.copyfile(files / "ext.img", files / "copy.img")
    (files / "ext.img").unlink()

    arr = opened.open(array.data_dir)
    with pytest.raises(LunUnavailable):
        arr.tracker("ext").check(before)
    lun = arr.repoint_lun("ext", files / "copy.img")
    assert lun.available
    assert lun.record.path == str(files / "copy.img")
    tracker = arr.tracker("ext")
    result = tracker.check(before)
    assert not result.intact
    assert "re-pointed" in result.reason
    after = tracker.token()
    assert after != before
    # The new file is what a restart opens, and with nothing written the token stays (C3).
    opened.close(arr)
    arr = opened.open(array.data_dir)
    assert arr.lun("ext").record.path == str(files / "copy.img")
    assert arr.tracker("ext").check(after).intact


def test_repointing_an_available_lun_changes_its_token(array: Array, files: Path) -> None:
    array.create_lun("ext", None, path=disk(files / "ext.img"))
    _, before = array.tracker("ext").acquire("backup")
    array.repoint_lun("ext", disk(files / "other.img"))
    assert not array.tracker("ext").check(before).intact
    # The old file is free again: its lock went with the old descriptor.
    assert array.create_lun("old", None, path=files / "ext.img").size == MiB


@pytest.mark.parametrize(
    ("target", "error", "match"),
    [
        ("small.img", InvalidArgument, "same size"),
        ("missing.img", InvalidArgument, "does not exist"),
        ("link.img", InvalidArgument, "symbolic link"),
        ("used.img", Conflict, "LUN used"),
    ],
)
def test_repoint_is_checked_like_create(
    array: Array, files: Path, target: str, error: type[LunsealError], match: str
) -> None:
    array.create_lun("ext", None, path=disk(files / "ext.img"))
    disk(files / "small.img", MiB // 2)
    (files / "link.img").symlink_to(files / "ext.img")
    array.create_lun("used", None, path=disk(files / "used.img"))
    with pytest.raises(error, match=match):
        array.repoint_lun("ext", files / target)
    assert array.lun("ext").record.path == str(files / "ext.img")
    assert array.lun("ext").available


def test_repoint_refuses_the_data_directory(array: Array) -> None:
    array.create_lun("a", MiB)
    with pytest.raises(InvalidArgument, match="inside the lunseal data directory"):
        array.repoint_lun("a", array.data_dir / CATALOG_FILE)


# -- a moved or copied data directory -------------------------------------------------------


def test_a_moved_data_directory_serves_its_own_files(opened: Opened, tmp_path: Path) -> None:
    arr = opened.open(tmp_path / "old")
    arr.create_lun("a", MiB).write(0, b"data")
    _, token = arr.tracker("a").acquire("b")
    opened.close(arr)
    (tmp_path / "old").rename(tmp_path / "new")

    moved = opened.open(tmp_path / "new")
    lun = moved.lun("a")
    assert lun.available
    assert lun.record.path == str(tmp_path / "new" / LUN_DIR / Path(lun.record.path).name)
    assert lun.read(0, 4) == b"data"
    assert moved.tracker("a").check(token).intact  # the same file, untouched (C3)


def test_a_copied_data_directory_never_writes_the_originals_files(
    opened: Opened, tmp_path: Path
) -> None:
    original = opened.open(tmp_path / "original")
    original.create_lun("a", MiB).write(0, b"orig")
    _, token = original.tracker("a").acquire("b")
    opened.close(original)
    shutil.copytree(tmp_path / "original", tmp_path / "copy")

    copy = opened.open(tmp_path / "copy")
    copy.lun("a").write(0, b"COPY")
    assert not copy.tracker("a").check(token).intact
    opened.close(copy)
    original = opened.open(tmp_path / "original")
    assert original.lun("a").read(0, 4) == b"orig"
    assert original.tracker("a").check(token).intact


def test_a_mirror_with_an_unavailable_leg_does_not_stop_the_array(
    opened: Opened, array: Array, files: Path
) -> None:
    source = array.create_lun("src", MiB)
    target = array.create_lun("dst", None, path=disk(files / "dst.img"))
    array.mirrors.create(source, target)
    opened.close(array)
    (files / "dst.img").unlink()

    arr = opened.open(array.data_dir)
    assert not arr.lun("dst").available
    assert arr.mirrors.all() == []  # dropped: a leg that cannot be read cannot be in sync
    arr.lun("src").write(0, b"still writable")
    assert arr.lun("src").read(0, 14) == b"still writable"
    with pytest.raises(LunUnavailable):
        arr.tracker("dst")
