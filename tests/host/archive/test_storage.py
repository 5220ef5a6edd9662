"""LocalStorage: atomic puts, listing that never shows half-written objects, the lock."""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.errors import BackendError, Conflict, InvalidArgument, NotFound
from lunseal.host.archive.storage import LocalStorage, Storage


@pytest.fixture
def store(tmp_path: Path) -> LocalStorage:
    root = tmp_path / "store"
    root.mkdir()
    return LocalStorage(root)


def all_files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_put_get_exists_size_delete(store: LocalStorage) -> None:
    store.put("chunks/ab/abcdef", b"hello")
    assert store.exists("chunks/ab/abcdef")
    assert store.get("chunks/ab/abcdef") == b"hello"
    assert store.size("chunks/ab/abcdef") == 5
    store.put("chunks/ab/abcdef", b"replaced")
    assert store.get("chunks/ab/abcdef") == b"replaced"
    store.delete("chunks/ab/abcdef")
    assert not store.exists("chunks/ab/abcdef")
    store.delete("chunks/ab/abcdef")  # idempotent, like an object store
    store.delete("nodir/at/all")


def test_missing_object_is_not_found(store: LocalStorage) -> None:
    with pytest.raises(NotFound, match=r"manifests/x\.json"):
        store.get("manifests/x.json")
    with pytest.raises(NotFound):
        store.size("manifests/x.json")


def test_put_leaves_no_temp_files(store: LocalStorage) -> None:
    for i in range(3):
        store.put("manifests/a.json", str(i).encode())
    assert all_files(store.root) == ["manifests/a.json"]


def test_list_is_sorted_and_filtered_by_prefix(store: LocalStorage) -> None:
    for key in ["manifests/b.json", "chunks/cd/cdef", "chunks/ab/ab01", "chunks/ab/ab00", "config"]:
        store.put(key, b"x")
    assert store.list("chunks/") == ["chunks/ab/ab00", "chunks/ab/ab01", "chunks/cd/cdef"]
    assert store.list("chunks/ab/ab01") == ["chunks/ab/ab01"]
    assert store.list("manifests/") == ["manifests/b.json"]
    assert store.list("") == [
        "chunks/ab/ab00",
        "chunks/ab/ab01",
        "chunks/cd/cdef",
        "config",
        "manifests/b.json",
    ]
    assert store.list("nothing/") == []


def test_list_never_shows_temp_files_or_the_lock(store: LocalStorage) -> None:
    store.put("chunks/ab/ab00", b"x")
    # What a writer killed between write and rename leaves behind.
    (store.root / "chunks" / "ab" / ".ab01.0123456789ab.tmp").write_bytes(b"half")
    (store.root / "manifests").mkdir()
    (store.root / "manifests" / ".m.json.0123456789ab.tmp").write_bytes(b"{")
    with store.lock(exclusive=False):
        assert store.list("") == ["chunks/ab/ab00"]
    assert not store.exists("chunks/ab/ab01")


@pytest.mark.parametrize(
    "key", ["", "/abs", "../x", "a/../b", "a//b", ".hidden", "a/.tmp", "a/b/", "sp ace", "a\\b"]
)
def test_bad_keys_are_rejected(store: LocalStorage, key: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put(key, b"x")
    with pytest.raises(InvalidArgument):
        store.get(key)


@pytest.fixture
def no_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("no_umask")
def test_modes_are_private_whatever_the_umask(store: LocalStorage) -> None:
    store.put("chunks/ab/abcd", b"x")
    assert stat.S_IMODE((store.root / "chunks" / "ab" / "abcd").stat().st_mode) == 0o600
    assert stat.S_IMODE((store.root / "chunks" / "ab").stat().st_mode) == 0o700
    assert stat.S_IMODE((store.root / "chunks").stat().st_mode) == 0o700


def test_failed_put_cleans_its_temp_file(store: LocalStorage) -> None:
    (store.root / "manifests" / "a.json").mkdir(parents=True)  # the rename will fail
    with pytest.raises(BackendError, match=r"manifests/a\.json"):
        store.put("manifests/a.json", b"data")
    assert list((store.root / "manifests").iterdir()) == [store.root / "manifests" / "a.json"]


def test_put_without_root_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFound):
        LocalStorage(tmp_path / "missing").put("config", b"x")


def test_sweep_removes_only_old_temp_files(store: LocalStorage) -> None:
    store.put("chunks/ab/abcd", b"x")
    old = store.root / "chunks" / "ab" / ".abce.aaaaaaaaaaaa.tmp"
    fresh = store.root / "chunks" / ".abcf.bbbbbbbbbbbb.tmp"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    an_hour_ago = time.time() - 3601
    os.utime(old, (an_hour_ago, an_hour_ago))
    with store.lock(exclusive=False):
        assert store.sweep(older_than=3600) == 1
    assert not old.exists()
    assert fresh.exists()
    assert (store.root / ".lock").exists()  # not a temp file: never swept
    assert store.get("chunks/ab/abcd") == b"x"


def test_exclusive_lock_excludes_shared_holders(store: LocalStorage) -> None:
    shared = (store.lock(exclusive=False), store.lock(exclusive=False))
    with shared[0], shared[1], pytest.raises(Conflict, match="a backup is running"):  # noqa: SIM117
        with store.lock(exclusive=True):
            pass
    with store.lock(exclusive=True), pytest.raises(Conflict, match="prune is running"):  # noqa: SIM117
        with store.lock(exclusive=False, timeout=0.1):
            pass
    with store.lock(exclusive=True):  # all released
        pass


def test_base_storage_has_nothing_to_sweep() -> None:
    class Nothing(LocalStorage):
        sweep = Storage.sweep

    assert Nothing(Path("/nonexistent")).sweep(0) == 0
