"""The SQLite catalog: durable meta values and LUN records."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.catalog import SCHEMA_VERSION, Catalog
from lunseal.engine.lun import LunRecord
from lunseal.errors import LunsealError


def record(name: str, number: int, **changes: object) -> LunRecord:
    rec = LunRecord(
        uuid=f"uuid-{name}",
        name=name,
        number=number,
        size=1 << 20,
        backend="file",
        path=f"/data/luns/{name}.img",
        owned=True,
        read_only=False,
        created_at=1700000000.5,
    )
    return rec.with_changes(**changes)


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "catalog.sqlite"


@pytest.fixture
def catalog(path: Path) -> Iterator[Catalog]:
    cat = Catalog(path)
    yield cat
    cat.close()


def reopened(catalog: Catalog) -> Catalog:
    catalog.close()
    return Catalog(catalog.path)


def test_uses_wal(catalog: Catalog) -> None:
    db = sqlite3.connect(catalog.path)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        db.close()


def test_records_the_schema_version(catalog: Catalog) -> None:
    assert catalog.schema_version == SCHEMA_VERSION
    db = sqlite3.connect(catalog.path)
    try:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        db.close()


def test_meta_is_set_overwritten_and_persisted(catalog: Catalog) -> None:
    assert catalog.get_meta("k") is None
    catalog.set_meta("k", "1")
    catalog.set_meta("k", "2")
    again = reopened(catalog)
    try:
        assert again.get_meta("k") == "2"
    finally:
        again.close()


def test_lun_records_round_trip_in_number_order(catalog: Catalog) -> None:
    b = record("b", 2, read_only=True, owned=False)
    a = record("a", 1)
    catalog.insert_lun(b)
    catalog.insert_lun(a)
    again = reopened(catalog)
    try:
        assert again.luns() == [a, b]
    finally:
        again.close()


def test_update_changes_size_and_read_only(catalog: Catalog) -> None:
    rec = record("a", 0)
    catalog.insert_lun(rec)
    changed = rec.with_changes(size=2 << 20, read_only=True)
    catalog.update_lun(changed)
    assert catalog.luns() == [changed]


def test_delete_removes_only_that_lun(catalog: Catalog) -> None:
    catalog.insert_lun(record("a", 0))
    catalog.insert_lun(record("b", 1))
    catalog.delete_lun("uuid-a")
    assert [r.name for r in catalog.luns()] == ["b"]


@pytest.mark.parametrize(
    "duplicate",
    [record("a", 5, uuid="other"), record("other", 0, uuid="other"), record("x", 9, uuid="uuid-a")],
    ids=["name", "number", "uuid"],
)
def test_names_numbers_and_uuids_are_unique(catalog: Catalog, duplicate: LunRecord) -> None:
    catalog.insert_lun(record("a", 0))
    with pytest.raises(sqlite3.IntegrityError):
        catalog.insert_lun(duplicate)
    assert len(catalog.luns()) == 1


def test_a_newer_schema_is_refused_and_the_database_closed(catalog: Catalog) -> None:
    catalog.close()
    db = sqlite3.connect(catalog.path)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    fds_before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(LunsealError, match="upgrade lunseal"):
        Catalog(catalog.path)
    assert len(os.listdir("/proc/self/fd")) == fds_before
