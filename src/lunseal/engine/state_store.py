"""SQLite persistence of LUN state, holds and change maps (shares the catalog's DB).

Every method commits before it returns; with ``synchronous=FULL`` that makes it
durable, which the state tracker relies on (the dirty mark must reach the
disk before the change it announces reaches the backend).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from lunseal.engine.backend import FileStamp
from lunseal.engine.changemap import ChangeMap
from lunseal.engine.state import Hold, LunState

SCHEMA = """
CREATE TABLE IF NOT EXISTS lun_state (
    lun_uuid     TEXT PRIMARY KEY,
    mode         TEXT NOT NULL,
    epoch        INTEGER NOT NULL,
    value        TEXT NOT NULL,
    flag         INTEGER NOT NULL,
    clean        INTEGER NOT NULL,
    stamp        TEXT,
    epoch_reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS holds (
    lun_uuid    TEXT NOT NULL,
    name        TEXT NOT NULL,
    created_at  REAL NOT NULL,
    token       TEXT NOT NULL,
    granularity INTEGER,
    map_size    INTEGER,
    map         BLOB,
    PRIMARY KEY (lun_uuid, name)
);
"""


class SqliteStateStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        with db:
            db.executescript(SCHEMA)

    def save_state(self, state: LunState) -> None:
        stamp = None if state.stamp is None else json.dumps(state.stamp.__dict__)
        self._db.execute(
            "INSERT INTO lun_state (lun_uuid, mode, epoch, value, flag, clean, stamp, "
            "epoch_reason) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(lun_uuid) DO UPDATE SET "
            "mode = excluded.mode, epoch = excluded.epoch, value = excluded.value, "
            "flag = excluded.flag, clean = excluded.clean, stamp = excluded.stamp, "
            "epoch_reason = excluded.epoch_reason",
            (
                state.lun_uuid,
                state.mode,
                state.epoch,
                str(state.value),  # text: the value may outgrow SQLite's 64-bit integers
                int(state.flag),
                int(state.clean),
                stamp,
                state.epoch_reason,
            ),
        )

    def load_state(self, lun_uuid: str) -> LunState | None:
        row = self._db.execute(
            "SELECT mode, epoch, value, flag, clean, stamp, epoch_reason FROM lun_state "
            "WHERE lun_uuid = ?",
            (lun_uuid,),
        ).fetchone()
        if row is None:
            return None
        mode, epoch, value, flag, clean, stamp, reason = row
        return LunState(
            lun_uuid=lun_uuid,
            mode=str(mode),
            epoch=int(epoch),
            value=int(value),
            flag=bool(flag),
            clean=bool(clean),
            stamp=None if stamp is None else FileStamp(**json.loads(stamp)),
            epoch_reason=str(reason),
        )

    def save_hold(self, lun_uuid: str, hold: Hold) -> None:
        changes = hold.changes
        self._db.execute(
            "INSERT OR REPLACE INTO holds (lun_uuid, name, created_at, token, granularity, "
            "map_size, map) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                lun_uuid,
                hold.name,
                hold.created_at,
                hold.token,
                None if changes is None else changes.granularity,
                None if changes is None else changes.size,
                None if changes is None else changes.to_blob(),
            ),
        )

    def delete_hold(self, lun_uuid: str, name: str) -> None:
        self._db.execute("DELETE FROM holds WHERE lun_uuid = ? AND name = ?", (lun_uuid, name))

    def save_change_maps(self, lun_uuid: str, holds: Iterable[Hold]) -> None:
        rows = [
            (h.changes.size, h.changes.to_blob(), lun_uuid, h.name)
            for h in holds
            if h.changes is not None
        ]
        if rows:
            with self._db:
                self._db.executemany(
                    "UPDATE holds SET map_size = ?, map = ? WHERE lun_uuid = ? AND name = ?", rows
                )

    def load_holds(self, lun_uuid: str) -> dict[str, Hold]:
        rows = self._db.execute(
            "SELECT name, created_at, token, granularity, map_size, map FROM holds "
            "WHERE lun_uuid = ? ORDER BY created_at",
            (lun_uuid,),
        ).fetchall()
        holds = {}
        for name, created_at, token, granularity, map_size, blob in rows:
            changes = None
            if granularity is not None:
                changes = ChangeMap.from_blob(int(map_size), int(granularity), bytes(blob))
            holds[str(name)] = Hold(str(name), float(created_at), str(token), changes)
        return holds

    def delete_lun(self, lun_uuid: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM holds WHERE lun_uuid = ?", (lun_uuid,))
            self._db.execute("DELETE FROM lun_state WHERE lun_uuid = ?", (lun_uuid,))
