"""Paths to a false "intact" (C1, C5, C6): a data directory rolled back or
cloned, writes into a backing file behind the running array's back, a catalog
that cannot be written, and catalogs of the counting-epoch schema."""

from __future__ import annotations

import re
import resource
import shutil
import signal
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from lunseal.engine.array import CATALOG_FILE, Array
from lunseal.engine.backends.layers import PowerLossBackend
from lunseal.engine.backends.memory import MemoryBackend
from lunseal.engine.catalog import SCHEMA_VERSION
from lunseal.errors import CatalogError
from tests.support.arrays import Arrays, abandon
from tests.support.tamper import dd

MiB = 1 << 20


def _copy(src: Path, dst: Path, how: str) -> None:
    if how == "cp -a":
        subprocess.run(["cp", "-a", str(src), str(dst)], check=True, timeout=60)
    else:
        shutil.copytree(src, dst, symlinks=True)


def _swap_in(snapshot: Path, data_dir: Path, how: str) -> None:
    """Put a copy of ``snapshot`` where the data directory is (a rollback, or a
    clone started on another machine: the catalog names the same paths)."""
    shutil.rmtree(data_dir)
    _copy(snapshot, data_dir, how)


def _writes(arr: Array, count: int, fill: int) -> set[str]:
    tokens = set()
    for i in range(count):
        arr.lun("a").write(0, bytes([fill, i]) * 256)
        tokens.add(arr.tracker("a").token())
    return tokens


# -- rollback and clone of the data directory -----------------------------------------------------


@pytest.mark.parametrize("how", ["cp -a", "copytree"])
@pytest.mark.parametrize("dirty", [False, True], ids=["clean-copy", "dirty-copy"])
def test_a_rolled_back_data_dir_never_repeats_a_later_token(
    tmp_path: Path, how: str, dirty: bool
) -> None:
    data, snapshot = tmp_path / "data", tmp_path / "snapshot"
    arrays = Arrays(data)
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("backup")
    arr.lun("a").write(0, b"first")
    if not dirty:
        arr.checkpoint(0)
    _copy(data, snapshot, how)  # the array is running: what a live snapshot catches

    # The original goes on: writes, a crash, more writes.
    original = _writes(arr, 4, 1)
    arr = arrays.crash()
    after_crash = {arr.tracker("a").token()} | _writes(arr, 8, 2)
    original |= after_crash
    arrays.close()

    # The data directory is rolled back to the snapshot and used again.
    _swap_in(snapshot, data, how)
    arr = arrays.open()
    first = arr.tracker("a").token()
    rolled_back = {first} | _writes(arr, 12, 3)
    arr = arrays.crash()
    rolled_back |= {arr.tracker("a").token()} | _writes(arr, 4, 4)
    assert not rolled_back & original, "a rolled-back array repeated a token for other data"
    # Tokens of the original's epochs the copy never saw are explained, not just refused.
    some = sorted(after_crash)[0]
    result = arr.tracker("a").check(some)
    assert not result.intact
    assert "not in this LUN's recorded history" in result.reason
    arrays.close()


@pytest.mark.parametrize("how", ["cp -a", "copytree"])
def test_two_clones_of_one_data_dir_never_share_a_token_after_writing(
    tmp_path: Path, how: str
) -> None:
    data, snapshot = tmp_path / "data", tmp_path / "snapshot"
    arrays = Arrays(data)
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("backup")
    arrays.close()
    _copy(data, snapshot, how)

    seen: list[set[str]] = []
    for clone in range(3):  # three machines started from the same image
        _swap_in(snapshot, data, how)
        arr = arrays.open()
        seen.append(_writes(arr, 5, 10 + clone))
        arrays.close()
    for i, tokens in enumerate(seen):
        for other in seen[i + 1 :]:
            assert not tokens & other, "two clones issued the same token for different data"


def test_an_idle_lun_keeps_its_token_across_clean_restarts(arrays: Arrays) -> None:
    """Random epochs do not cost C3: only a write or a recovery starts a new one."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    _h, token = arr.tracker("a").acquire("backup")
    arr.lun("a").write(0, b"x")
    after = arr.tracker("a").token()
    arr.checkpoint(0)
    for _ in range(3):
        arr = arrays.restart()
        assert arr.tracker("a").token() == after
    arr = arrays.crash()
    assert arr.tracker("a").token() == after
    assert token != after


# -- catalogs of schema 1 -------------------------------------------------------------------------


def _downgrade_to_schema_1(catalog: Path, epoch: int) -> None:
    """Rewrite a catalog as lunseal with counting epochs left it."""
    db = sqlite3.connect(catalog, isolation_level=None)
    db.execute("CREATE TABLE old AS SELECT * FROM lun_state")
    db.execute("DROP TABLE lun_state")
    db.execute(
        "CREATE TABLE lun_state (lun_uuid TEXT PRIMARY KEY, mode TEXT NOT NULL, epoch INTEGER "
        "NOT NULL, value TEXT NOT NULL, flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp "
        "TEXT, epoch_reason TEXT NOT NULL)"
    )
    db.execute(
        "INSERT INTO lun_state SELECT lun_uuid, mode, ?, value, flag, clean, stamp, "
        "epoch_reason FROM old",
        (epoch,),
    )
    db.execute("DROP TABLE old")
    # Schema 4's tables did not exist yet (children before parents).
    for table in ("iscsi_lun_access", "iscsi_initiators", "scsi_pr_registrations", "scsi_pr_state"):
        db.execute(f"DROP TABLE {table}")
    db.execute("INSERT INTO meta (key, value) VALUES ('schema_version', '1')")
    db.execute("PRAGMA user_version = 0")  # schema 1 kept its version in meta
    db.close()


def test_a_schema_1_catalog_is_migrated_and_keeps_its_tokens(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("backup")
    uuid = arr.lun("a").record.uuid
    value = arr.tracker("a").state.value
    arrays.close()
    _downgrade_to_schema_1(arrays.data_dir / CATALOG_FILE, 3)
    old_token = f"lst1.{uuid}.3.counter.{value}"

    arr = arrays.open()
    assert arr.catalog.schema_version == SCHEMA_VERSION
    assert arr.tracker("a").token() == old_token  # C3 across the upgrade
    assert arr.tracker("a").check(old_token).intact
    arr.lun("a").write(0, b"x")
    new = arr.tracker("a").token()
    assert re.fullmatch(rf"lst1\.{uuid}\.[0-9a-f]{{16}}\.counter\.\d+", new)
    assert "data was written" in arr.tracker("a").check(old_token).reason
    arr = arrays.restart()
    assert arr.tracker("a").token() == new  # the text epoch round-trips


def test_an_all_digit_random_epoch_round_trips_as_text(arrays: Arrays) -> None:
    """A column of INTEGER affinity would store "0123456789012345" as a number."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("backup")
    arr.tracker("a").state.epoch = "0123456789012345"
    arr.tracker("a").state.clean = False  # close records the state
    token = arr.tracker("a").token()
    arr = arrays.restart()
    assert arr.tracker("a").token() == token


# -- writes into the backing file while the array runs --------------------------------------------


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


def test_a_write_behind_a_clean_running_lun_is_seen_at_token_and_check(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    _h, token = tracker.acquire("backup", granularity=64 << 10)
    dd(Path(arr.lun("a").record.path), 4096, b"tampered")
    result = tracker.check(token)
    assert not result.intact
    assert "changed by another process while the array was running" in result.reason
    assert "mtime_ns" in result.reason
    assert tracker.token() != token
    # The change map cannot know where: it covers everything.
    changes = tracker.hold("backup").changes
    assert changes is not None
    assert changes.changed_bytes() == MiB
    # The new epoch is durable: a restart does not bring the old token back.
    current = tracker.token()
    arr = arrays.restart()
    assert arr.tracker("a").token() == current


def test_a_write_behind_a_dirty_lun_is_seen_at_the_checkpoint(arrays: Arrays) -> None:
    """The reported bug: the tampered file's stamp used to be recorded as clean."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    arr.lun("a").write(0, b"own")
    token = tracker.token()
    path = Path(arr.lun("a").record.path)
    dd(path, 8192, b"tampered")
    arr.checkpoint(0)  # no token asked for in between
    assert not tracker.dirty
    assert FOREIGN_RE.search(tracker.state.epoch_reason)
    result = tracker.check(token)
    assert not result.intact
    assert FOREIGN_RE.search(result.reason)


FOREIGN_RE = re.compile(r"changed by another process while the array was running")


def test_a_write_behind_followed_by_own_writes_is_still_seen(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    lun = arr.lun("a")
    lun.write(0, b"own")
    token = tracker.token()
    dd(Path(lun.record.path), 8192, b"tampered")
    for i in range(5):  # own writes after the foreign one must not absorb it
        lun.write(512 * i, b"more")
    result = tracker.check(token)
    assert not result.intact
    assert FOREIGN_RE.search(result.reason)


def test_own_writes_alone_never_look_foreign(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    lun = arr.lun("a")
    for i in range(50):
        lun.write(4096 * i, b"x" * 4096)
        lun.trim(4096 * i, 512)
        lun.zero(4096 * i + 1024, 512)
        if i % 10 == 0:
            arr.grow_lun("a", lun.size + 4096)
            arr.checkpoint(0)
        tracker.token()
    reasons = [r for _, r in tracker.state.history]
    assert not any(FOREIGN_RE.search(r) for r in reasons), reasons


# -- a catalog that cannot be written -------------------------------------------------------------


@contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """A real kernel limit: writes past ``limit`` bytes of any file fail (EFBIG)."""
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def catalog_full(arr: Array) -> AbstractContextManager[None]:
    """The catalog's WAL can grow no more; the LUNs' first blocks stay writable."""
    wal = arr.data_dir / (CATALOG_FILE + "-wal")
    return file_size_limit(max(wal.stat().st_size, 8192))


def test_a_write_whose_dirty_mark_fails_is_refused(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    _h, token = tracker.acquire("backup")
    lun = arr.lun("a")
    with catalog_full(arr):
        for _ in range(3):  # not only the first: the state must not turn dirty in memory
            with pytest.raises(CatalogError, match="catalog failure"):
                lun.write(0, b"lost")
            assert not tracker.dirty
        assert lun.read(0, 4) == bytes(4)  # the backend was never touched
        assert tracker.token() == token
    lun.write(0, b"kept")
    assert tracker.token() != token
    assert tracker.dirty


def test_a_failing_checkpoint_keeps_the_lun_dirty_and_recovers(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.create_lun("b", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    arr.lun("a").write(0, b"x")
    arr.lun("b").write(0, b"x")
    with catalog_full(arr):
        with pytest.raises(CatalogError):
            arr.checkpoint(0)
        assert tracker.dirty
    arr.checkpoint(0)
    assert not tracker.dirty
    assert not arr.tracker("b").dirty
    token = tracker.token()
    arr = arrays.crash()
    assert arr.tracker("a").token() == token


def test_catalog_failures_of_holds_leave_the_state_as_it_was(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    before = (tracker.state.epoch, tracker.state.value)
    with catalog_full(arr), pytest.raises(CatalogError):
        tracker.acquire("backup")
    assert not tracker.holds
    assert (tracker.state.epoch, tracker.state.value) == before
    _h, token = tracker.acquire("backup")
    assert tracker.token() == token


# -- the power-loss layer -------------------------------------------------------------------------


def test_power_loss_drops_exactly_the_unflushed_writes() -> None:
    layer = PowerLossBackend(MemoryBackend(64 << 10))
    layer.write(0, b"a" * 512)
    layer.flush()
    layer.write(0, b"b" * 256)
    layer.zero(4096, 512, may_trim=True, fast_only=False)
    layer.write(4096, b"c" * 512)
    layer.trim(0, 128)
    assert layer.unflushed == 4
    assert layer.power_loss() == 4
    assert layer.read(0, 512) == b"a" * 512
    assert layer.read(4096, 512) == bytes(512)
    assert layer.power_loss() == 0


def test_power_loss_after_a_checkpoint_keeps_the_token(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    layer = PowerLossBackend(arr.lun("a")._backend)
    arr.lun("a")._backend = layer
    arr.tracker("a").acquire("backup")
    arr.lun("a").write(0, b"x")
    arr.checkpoint(0)  # flushes: nothing left to lose
    token = arr.tracker("a").token()
    assert layer.power_loss() == 0
    abandon(arr)
    arrays.current = None
    arr = arrays.open()
    assert arr.tracker("a").token() == token
    arr.lun("a").write(0, b"y")
    later = arr.tracker("a").token()
    layer = PowerLossBackend(arr.lun("a")._backend)
    arr.lun("a")._backend = layer
    assert layer.power_loss() == 0  # installed after the write: nothing tracked
    arr.lun("a").write(512, b"z")
    lost = arr.tracker("a").token()
    assert layer.power_loss() == 1
    abandon(arr)
    arrays.current = None
    arr = arrays.open()
    assert arr.tracker("a").token() not in {token, later, lost}
    assert "unclean shutdown" in arr.tracker("a").state.epoch_reason


def test_a_write_behind_seen_while_the_catalog_fails_is_not_forgotten(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    _h, token = tracker.acquire("backup")
    dd(Path(arr.lun("a").record.path), 0, b"tampered")
    with catalog_full(arr):
        for _ in range(2):
            with pytest.raises(CatalogError):
                arr.checkpoint(0)
        with pytest.raises(CatalogError):
            tracker.check(token)
    arr.checkpoint(0)
    assert FOREIGN_RE.search(tracker.state.epoch_reason)
    assert not tracker.check(token).intact


def test_a_catalog_at_its_page_limit_refuses_the_write_with_sqlite_full(arrays: Arrays) -> None:
    """SQLite's own "database or disk is full": the catalog may not grow a page
    (``PRAGMA max_page_count``) and the epoch history makes the dirty marks grow."""
    arr = arrays.open()
    for name in ("a", "b"):
        arr.create_lun(name, MiB)
        arr.tracker(name).acquire("backup")
    db = arr.catalog._db
    db.execute("VACUUM")  # no free pages left over from the schema's migration steps
    (pages,) = db.execute("PRAGMA page_count").fetchone()
    db.execute(f"PRAGMA max_page_count = {pages}")
    failed = None
    for i in range(200):
        for name in ("a", "b"):
            lun, tracker = arr.lun(name), arr.tracker(name)
            before = (lun.read(0, 512), tracker.token())
            try:
                lun.write(0, bytes([i + 1]) * 512)
            except CatalogError as exc:
                failed = exc
                break
            arr.checkpoint(0)
        if failed:
            break
    assert failed is not None, "the catalog never filled up"
    assert "database or disk is full" in failed.message
    assert (lun.read(0, 512), tracker.token()) == before  # nothing acknowledged, nothing written
    assert not tracker.dirty
    db.execute("PRAGMA max_page_count = 1073741823")
    lun.write(0, b"room again")
    assert tracker.dirty
