"""The catalog's schema: migrations from every earlier version, foreign keys, and one
transaction per composite update (all of it or none of it reaches the file)."""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.identity import CATALOG_FILE
from lunseal.engine.catalog import SCHEMA_VERSION, Catalog
from lunseal.engine.mirror.mirror import GRANULARITY, SOURCE, TARGET, MirrorRecord, MirrorState
from lunseal.engine.sqlite_guard import transaction
from lunseal.engine.state.changemap import ChangeMap
from lunseal.engine.state.tracker import Hold, LunState, format_token
from lunseal.errors import CatalogError
from tests.support.arrays import Arrays

MiB = 1 << 20
LUN = "11111111-2222-3333-4444-555555555555"
GONE = "99999999-2222-3333-4444-555555555555"

# -- the DDL of earlier versions, as they wrote it -------------------------------------------

_V1_BASE = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE luns (uuid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, number INTEGER NOT NULL
    UNIQUE, size INTEGER NOT NULL, backend TEXT NOT NULL, path TEXT NOT NULL, owned INTEGER NOT
    NULL, read_only INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE holds (lun_uuid TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
    token TEXT NOT NULL, granularity INTEGER, map_size INTEGER, map BLOB,
    PRIMARY KEY (lun_uuid, name));
"""
_V1_STATE = """
CREATE TABLE lun_state (lun_uuid TEXT PRIMARY KEY, mode TEXT NOT NULL, epoch INTEGER NOT NULL,
    value TEXT NOT NULL, flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp TEXT,
    epoch_reason TEXT NOT NULL);
"""
_V2_STATE = """
CREATE TABLE lun_state (lun_uuid TEXT PRIMARY KEY, mode TEXT NOT NULL, epoch TEXT NOT NULL,
    value TEXT NOT NULL, flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp TEXT,
    epoch_reason TEXT NOT NULL, epoch_history TEXT NOT NULL DEFAULT '[]');
"""
_MIRRORS = """
CREATE TABLE mirrors (id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, source_uuid TEXT NOT
    NULL, target_uuid TEXT NOT NULL UNIQUE, state TEXT NOT NULL, created_at REAL NOT NULL,
    split_at REAL, target_access TEXT NOT NULL, op_total INTEGER NOT NULL, reason TEXT NOT NULL);
CREATE TABLE mirror_maps (mirror_id TEXT NOT NULL, side TEXT NOT NULL, size INTEGER NOT NULL,
    map BLOB NOT NULL, PRIMARY KEY (mirror_id, side));
CREATE TABLE mirror_intents (mirror_id TEXT NOT NULL, side TEXT NOT NULL, region INTEGER NOT
    NULL, PRIMARY KEY (mirror_id, side, region));
"""


def _lun_row(uuid: str, name: str, number: int) -> tuple[object, ...]:
    return (uuid, name, number, MiB, "file", f"/data/{name}.img", 1, 0, 1.0)


def old_catalog(path: Path, version: int, *, mirrors: bool = True) -> None:
    """A catalog as lunseal of schema ``version`` (kept in meta) left it: two LUNs, a
    tracked state with a hold and its change map, a mirror with maps and an intent,
    and rows a crash between separate deletes left behind for a deleted LUN."""
    db = sqlite3.connect(path, isolation_level=None)
    db.executescript(_V1_BASE + (_V1_STATE if version == 1 else _V2_STATE))
    if mirrors:
        db.executescript(_MIRRORS)
    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(version),))
    for row in (_lun_row(LUN, "a", 0), _lun_row(LUN[:-1] + "6", "b", 1)):
        db.execute("INSERT INTO luns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", row)
    epoch = 7 if version == 1 else "00000000000000a7"
    for uuid in (LUN, GONE):
        db.execute(
            "INSERT INTO lun_state (lun_uuid, mode, epoch, value, flag, clean, stamp, "
            "epoch_reason) VALUES (?, 'counter', ?, '12', 0, 1, NULL, 'recovered')",
            (uuid, epoch),
        )
    if version >= 2:
        db.execute(
            "UPDATE lun_state SET epoch_history = ?", (json.dumps([["5", "data was written"]]),)
        )
    changes = ChangeMap(MiB, 65536)
    changes.mark(0, 4096)
    for uuid in (LUN, GONE):
        db.execute(
            "INSERT INTO holds VALUES (?, 'backup', 2.0, 'tok', 65536, ?, ?)",
            (uuid, MiB, changes.to_blob()),
        )
    if mirrors:
        db.execute(
            "INSERT INTO mirrors VALUES ('m1', 'mb', ?, ?, 'split', 3.0, 4.0, 'ro', 0, '')",
            (LUN, LUN[:-1] + "6"),
        )
        for side in (SOURCE, TARGET):
            db.execute(
                "INSERT INTO mirror_maps VALUES ('m1', ?, ?, ?)",
                (side, MiB, ChangeMap(MiB, GRANULARITY).to_blob()),
            )
        db.execute("INSERT INTO mirror_intents VALUES ('m1', 'source', 0)")
        db.execute("INSERT INTO mirror_maps VALUES ('gone', 'source', 1, x'00')")
    db.close()


def tables(path: Path) -> dict[str, object]:
    """Each table's columns, foreign keys and indexes (not the DDL's spelling)."""
    db = sqlite3.connect(path)
    try:
        names = [
            str(r[0]) for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        ]
        return {
            name: [
                db.execute(f"PRAGMA {pragma}({name})").fetchall()
                for pragma in ("table_info", "foreign_key_list", "index_list")
            ]
            for name in names
        }
    finally:
        db.close()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / CATALOG_FILE


@pytest.fixture
def catalog(path: Path) -> Iterator[Catalog]:
    cat = Catalog(path)
    yield cat
    cat.close()


# -- migrations --------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
def test_an_old_catalog_migrates_and_keeps_its_tokens(path: Path, version: int) -> None:
    old_catalog(path, version)
    cat = Catalog(path)
    try:
        assert cat.schema_version == SCHEMA_VERSION
        assert cat.get_meta("schema_version") is None  # the version moved to user_version
        state = cat.states.load_state(LUN)
        assert state is not None
        epoch = "7" if version == 1 else "00000000000000a7"
        assert format_token(LUN, state.epoch, state.mode, state.value) == (
            f"lst1.{LUN}.{epoch}.counter.12"
        )
        assert state.history == ([] if version == 1 else [("5", "data was written")])
        hold = cat.states.load_holds(LUN)["backup"]
        assert hold.changes is not None
        assert hold.changes.changed_regions() == 1
        # The deleted LUN's leftovers are gone; everything else is kept.
        assert cat.states.load_state(GONE) is None
        assert cat.states.load_holds(GONE) == {}
        [mirror] = cat.mirrors.mirrors()
        assert (mirror.name, mirror.state, mirror.split_at) == ("mb", "split", 4.0)
        maps, intents = cat.mirrors.load_maps("m1", MiB)
        assert intents == {(SOURCE, 0)}
        assert set(maps) == {SOURCE, TARGET}
    finally:
        cat.close()


def test_a_catalog_from_before_mirrors_gets_their_tables(path: Path) -> None:
    old_catalog(path, 1, mirrors=False)
    Catalog(path).close()
    assert {"mirrors", "mirror_maps", "mirror_intents"} <= set(tables(path))


@pytest.mark.parametrize("version", [1, 2])
def test_a_migrated_catalog_has_exactly_the_schema_of_a_new_one(
    tmp_path: Path, path: Path, version: int
) -> None:
    Catalog(tmp_path / "new.sqlite").close()
    old_catalog(path, version)
    Catalog(path).close()
    assert tables(path) == tables(tmp_path / "new.sqlite")


def test_a_failed_step_leaves_the_catalog_at_its_old_version(path: Path) -> None:
    old_catalog(path, 2)
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("CREATE TABLE mirrors_v2 (x)")  # in the way of step 3's rebuild of mirrors
    db.close()
    before = tables(path)
    with pytest.raises(CatalogError, match="upgrade to schema 3 failed"):
        Catalog(path)
    # Step 3 renamed lun_state and holds before it failed: all of it was rolled back.
    assert tables(path) == before
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert db.execute("SELECT count(*) FROM holds").fetchone()[0] == 2
    finally:
        db.close()


# -- foreign keys ------------------------------------------------------------------------------


def _insert_lun(cat: Catalog, uuid: str, name: str, number: int) -> None:
    cat._db.execute(
        "INSERT INTO luns VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", _lun_row(uuid, name, number)
    )


def test_state_and_holds_of_a_lun_that_does_not_exist_are_refused(catalog: Catalog) -> None:
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        catalog.states.save_state(LunState(GONE))
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        catalog.states.save_hold(GONE, Hold("h", 1.0, "tok"))


def test_mirrors_and_maps_must_name_what_exists(catalog: Catalog) -> None:
    _insert_lun(catalog, LUN, "a", 0)
    rec = MirrorRecord(
        id="m1",
        name="m",
        source_uuid=LUN,
        target_uuid=GONE,
        state=MirrorState.SYNCING,
        created_at=1.0,
    )
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        catalog.mirrors.save_mirror(rec)
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        catalog.mirrors.save_maps("nope", {SOURCE: ChangeMap(MiB, GRANULARITY)})
    assert catalog.mirrors.mirrors() == []


def test_deleting_a_lun_takes_its_state_and_holds_but_not_a_mirror(catalog: Catalog) -> None:
    _insert_lun(catalog, LUN, "a", 0)
    _insert_lun(catalog, GONE, "b", 1)
    catalog.states.save_hold(LUN, Hold("h", 1.0, "tok"), LunState(LUN))
    catalog.delete_lun(LUN)
    assert catalog.states.load_state(LUN) is None
    assert catalog.states.load_holds(LUN) == {}
    _insert_lun(catalog, LUN, "a", 0)
    rec = MirrorRecord(
        id="m1",
        name="m",
        source_uuid=LUN,
        target_uuid=GONE,
        state=MirrorState.SYNCING,
        created_at=1.0,
    )
    catalog.mirrors.save_mirror(rec, {SOURCE: ChangeMap(MiB, GRANULARITY)})
    with pytest.raises(sqlite3.IntegrityError, match="FOREIGN KEY"):
        catalog.delete_lun(GONE)  # the array deletes a LUN's mirrors first
    catalog.mirrors.save_mirror(
        rec.with_changes(state=MirrorState.SYNCED)
    )  # an update keeps the maps
    assert set(catalog.mirrors.load_maps("m1", MiB)[0]) == {SOURCE, TARGET}
    assert catalog._db.execute("SELECT count(*) FROM mirror_maps").fetchone()[0] == 1
    catalog.mirrors.delete_mirror("m1")
    assert catalog._db.execute("SELECT count(*) FROM mirror_maps").fetchone()[0] == 0
    catalog.delete_lun(GONE)


# -- composite updates: one transaction each ---------------------------------------------------


def deny(db: sqlite3.Connection, action: int, table: str) -> None:
    """Make SQLite refuse one kind of statement on ``table`` (a failing second step)."""

    def authorizer(code: int, arg1: str | None, *_: object) -> int:
        return sqlite3.SQLITE_DENY if code == action and arg1 == table else sqlite3.SQLITE_OK

    db.set_authorizer(authorizer)


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    arrs = Arrays(tmp_path / "data")
    yield arrs
    arrs.close()


def persisted(array: Array, uuid: str) -> tuple[list[tuple[object, ...]], list[tuple[object, ...]]]:
    """The LUN's state and hold rows as another process reads them from the file."""
    db = sqlite3.connect(array.catalog.path)
    try:
        state = db.execute("SELECT * FROM lun_state WHERE lun_uuid = ?", (uuid,)).fetchall()
        holds = db.execute("SELECT name FROM holds WHERE lun_uuid = ?", (uuid,)).fetchall()
    finally:
        db.close()
    return state, holds


def test_a_failed_hold_acquire_changes_neither_state_nor_holds(arrays: Arrays) -> None:
    array = arrays.open()
    lun = array.create_lun("a", MiB)
    tracker = array.tracker("a")
    before, state = persisted(array, lun.record.uuid), tracker.state
    deny(array.catalog._db, sqlite3.SQLITE_INSERT, "holds")
    with pytest.raises(CatalogError):
        tracker.acquire("backup")
    array.catalog._db.set_authorizer(None)
    assert persisted(array, lun.record.uuid) == before
    assert tracker.state == state
    assert not tracker.holds
    tracker.acquire("backup")  # and it works once the catalog does
    assert persisted(array, lun.record.uuid) != before


def test_a_failed_release_of_the_last_hold_changes_neither(arrays: Arrays) -> None:
    array = arrays.open()
    lun = array.create_lun("a", MiB)
    tracker = array.tracker("a")
    tracker.acquire("backup")
    before, state, token = persisted(array, lun.record.uuid), tracker.state, tracker.token()
    deny(array.catalog._db, sqlite3.SQLITE_DELETE, "holds")
    with pytest.raises(CatalogError):
        tracker.release("backup")
    array.catalog._db.set_authorizer(None)
    assert persisted(array, lun.record.uuid) == before
    assert tracker.state == state
    assert tracker.token() == token
    arrays.close()
    assert arrays.open().tracker("a").token() == token


def test_a_mirror_is_saved_with_its_maps_or_not_at_all(arrays: Arrays) -> None:
    array = arrays.open()
    source, target = array.create_lun("src", MiB), array.create_lun("dst", MiB)
    deny(array.catalog._db, sqlite3.SQLITE_INSERT, "mirror_maps")
    with pytest.raises(CatalogError):
        array.mirrors.create(source, target)
    array.catalog._db.set_authorizer(None)
    assert array.catalog.mirrors.mirrors() == []


def test_a_save_by_another_thread_never_joins_a_transaction_that_rolls_back(
    catalog: Catalog,
) -> None:
    """One connection serves every thread: a save made while another thread's
    composite update is open must wait for it, not vanish with its rollback."""
    _insert_lun(catalog, LUN, "a", 0)
    _insert_lun(catalog, GONE, "b", 1)
    saved = threading.Event()

    def save_b() -> None:
        catalog.states.save_state(LunState(GONE, value=42))
        saved.set()

    def composite_whose_second_step_fails() -> None:
        with transaction(catalog._db):
            catalog.states.save_state(LunState(LUN, value=7))
            other.start()
            saved.wait(0.5)  # without the lock the save lands inside this transaction
            raise RuntimeError("the composite update's second step fails")

    other = threading.Thread(target=save_b)
    with pytest.raises(RuntimeError):
        composite_whose_second_step_fails()
    other.join(30)
    assert saved.is_set()
    assert catalog.states.load_state(LUN) is None  # rolled back
    state = catalog.states.load_state(GONE)
    assert state is not None
    assert state.value == 42  # durable, as its caller was told
