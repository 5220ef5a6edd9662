"""SQLite persistence of LUN state, holds and change maps (shares the catalog's DB;
the tables are defined by the catalog's migrations).

Every method commits before it returns; with ``synchronous=FULL`` that makes it
durable, which the state tracker relies on (the dirty mark must reach the
disk before the change it announces reaches the backend).  A method that
writes more than one row does so in one transaction: all or nothing.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable

from lunseal.engine.backends.base import FileStamp
from lunseal.engine.sqlite_guard import guarded, transaction
from lunseal.engine.state.changemap import ChangeMap
from lunseal.engine.state.tracker import Hold, LunState, TrackingMode


class SqliteStateStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @guarded
    def save_state(self, state: LunState) -> None:
        self._save_state(state)

    def _save_state(self, state: LunState) -> None:
        stamp = None if state.stamp is None else json.dumps(state.stamp.__dict__)
        self._db.execute(
            "INSERT INTO lun_state (lun_uuid, mode, epoch, value, flag, clean, stamp, "
            "epoch_reason, epoch_history) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(lun_uuid) DO UPDATE SET "
            "mode = excluded.mode, epoch = excluded.epoch, value = excluded.value, "
            "flag = excluded.flag, clean = excluded.clean, stamp = excluded.stamp, "
            "epoch_reason = excluded.epoch_reason, epoch_history = excluded.epoch_history",
            (
                state.lun_uuid,
                state.mode,
                state.epoch,
                str(state.value),  # text: the value may outgrow SQLite's 64-bit integers
                int(state.flag),
                int(state.clean),
                stamp,
                state.epoch_reason,
                json.dumps(state.history),
            ),
        )

    @guarded
    def load_state(self, lun_uuid: str) -> LunState | None:
        row = self._db.execute(
            "SELECT mode, epoch, value, flag, clean, stamp, epoch_reason, epoch_history "
            "FROM lun_state WHERE lun_uuid = ?",
            (lun_uuid,),
        ).fetchone()
        if row is None:
            return None
        mode, epoch, value, flag, clean, stamp, reason, history = row
        return LunState(
            lun_uuid=lun_uuid,
            mode=TrackingMode(str(mode)),
            epoch=str(epoch),
            value=int(value),
            flag=bool(flag),
            clean=bool(clean),
            stamp=None if stamp is None else FileStamp(**json.loads(stamp)),
            epoch_reason=str(reason),
            history=[(str(e), str(r)) for e, r in json.loads(history)],
        )

    @guarded
    def save_hold(self, lun_uuid: str, hold: Hold, state: LunState | None = None) -> None:
        """Save a new hold, and with it ``state`` (the first hold turns tracking on)."""
        with transaction(self._db):
            if state is not None:
                self._save_state(state)
            self._insert_hold(lun_uuid, hold)

    def _insert_hold(self, lun_uuid: str, hold: Hold) -> None:
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

    @guarded
    def delete_hold(self, lun_uuid: str, name: str, state: LunState | None = None) -> None:
        """Delete a hold, and save ``state`` with it (the last hold turns tracking off)."""
        with transaction(self._db):
            if state is not None:
                self._save_state(state)
            self._db.execute("DELETE FROM holds WHERE lun_uuid = ? AND name = ?", (lun_uuid, name))

    @guarded
    def save_change_maps(self, lun_uuid: str, holds: Iterable[Hold]) -> None:
        rows = [
            (h.changes.size, h.changes.to_blob(), lun_uuid, h.name)
            for h in holds
            if h.changes is not None
        ]
        if rows:
            with transaction(self._db):
                self._db.executemany(
                    "UPDATE holds SET map_size = ?, map = ? WHERE lun_uuid = ? AND name = ?", rows
                )

    @guarded
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
