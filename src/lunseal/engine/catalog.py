"""The SQLite catalog: everything that must survive a restart.

One database file in the data directory, WAL mode, ``synchronous=FULL``:
catalog changes are rare management operations, so every commit is durable.
Schema changes bump ``SCHEMA_VERSION`` and add a migration step.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Literal, Self

from lunseal.engine.lun import LunRecord
from lunseal.engine.mirror_store import SqliteMirrorStore
from lunseal.engine.sqlite_guard import guarded
from lunseal.engine.state_store import SqliteStateStore, migrate_epochs_to_text
from lunseal.errors import LunsealError

#: 2: state epochs are random text with a history (schema 1 counted them).
SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS luns (
    uuid       TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    number     INTEGER NOT NULL UNIQUE,
    size       INTEGER NOT NULL,
    backend    TEXT NOT NULL,
    path       TEXT NOT NULL,
    owned      INTEGER NOT NULL,
    read_only  INTEGER NOT NULL,
    created_at REAL NOT NULL
);
"""

_LUN_COLUMNS = "uuid, name, number, size, backend, path, owned, read_only, created_at"


class _LockedConnection(sqlite3.Connection):
    """A connection several threads may use: each statement, and each ``with``
    block as a whole, runs under one re-entrant lock, so one LUN worker's
    commit never lands inside another thread's transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().executescript(*args, **kwargs)

    def __enter__(self) -> Self:
        self.lock.acquire()
        try:
            return super().__enter__()
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc: Any) -> Literal[False]:
        try:
            return super().__exit__(*exc)
        finally:
            self.lock.release()


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        # One connection shared by the event loop and every LUN's worker:
        # _LockedConnection serialises its statements and ``with`` blocks.
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=_LockedConnection
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            self._migrate()
            self.states = SqliteStateStore(self._db)
            self.mirrors = SqliteMirrorStore(self._db)
        except BaseException:
            self._db.close()  # e.g. a newer schema: do not leave the database open
            raise

    def _migrate(self) -> None:
        with self._db:
            self._db.executescript(_SCHEMA)
            found = self.get_meta("schema_version")
            if found is not None and int(found) > SCHEMA_VERSION:
                raise LunsealError(
                    f"catalog {self.path} has schema version {found}, newer than this "
                    f"lunseal ({SCHEMA_VERSION}); upgrade lunseal"
                )
            if found is not None and int(found) < 2:
                migrate_epochs_to_text(self._db)
            if found != str(SCHEMA_VERSION):
                self.set_meta("schema_version", str(SCHEMA_VERSION))

    def close(self) -> None:
        self._db.close()

    # -- meta ---------------------------------------------------------------

    @guarded
    def get_meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    @guarded
    def set_meta(self, key: str, value: str) -> None:
        self._db.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?) "
            "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    # -- LUNs -----------------------------------------------------------------

    @guarded
    def luns(self) -> list[LunRecord]:
        rows = self._db.execute(f"SELECT {_LUN_COLUMNS} FROM luns ORDER BY number").fetchall()
        return [_record(row) for row in rows]

    @guarded
    def insert_lun(self, rec: LunRecord) -> None:
        self._db.execute(
            f"INSERT INTO luns ({_LUN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                rec.uuid,
                rec.name,
                rec.number,
                rec.size,
                rec.backend,
                rec.path,
                int(rec.owned),
                int(rec.read_only),
                rec.created_at,
            ),
        )

    @guarded
    def update_lun(self, rec: LunRecord) -> None:
        self._db.execute(
            "UPDATE luns SET name = ?, number = ?, size = ?, read_only = ? WHERE uuid = ?",
            (rec.name, rec.number, rec.size, int(rec.read_only), rec.uuid),
        )

    @guarded
    def update_lun_backing(self, rec: LunRecord) -> None:
        """A LUN re-pointed at another backing file."""
        self._db.execute(
            "UPDATE luns SET path = ?, owned = ?, size = ? WHERE uuid = ?",
            (rec.path, int(rec.owned), rec.size, rec.uuid),
        )

    @guarded
    def delete_lun(self, uuid: str) -> None:
        self._db.execute("DELETE FROM luns WHERE uuid = ?", (uuid,))


def _record(row: tuple[object, ...]) -> LunRecord:
    uuid, name, number, size, backend, path, owned, read_only, created_at = row
    return LunRecord(
        uuid=str(uuid),
        name=str(name),
        number=int(number),  # type: ignore[call-overload]
        size=int(size),  # type: ignore[call-overload]
        backend=str(backend),
        path=str(path),
        owned=bool(owned),
        read_only=bool(read_only),
        created_at=float(created_at),  # type: ignore[arg-type]
    )
