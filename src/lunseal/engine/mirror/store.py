"""SQLite persistence of mirrors, their region maps and intent logs (the tables are
defined by the catalog's migrations; a mirror's maps and intents go with it)."""

from __future__ import annotations

import sqlite3

from lunseal.engine.mirror.mirror import (
    GRANULARITY,
    INTENT_REGION,
    SOURCE,
    TARGET,
    MirrorRecord,
    MirrorState,
    TargetAccess,
)
from lunseal.engine.sqlite_guard import guarded, transaction
from lunseal.engine.state.changemap import ChangeMap

_COLUMNS = (
    "id, name, source_uuid, target_uuid, state, created_at, split_at, target_access, "
    "op_total, reason"
)


class SqliteMirrorStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @guarded
    def save_mirror(self, rec: MirrorRecord, maps: dict[str, ChangeMap] | None = None) -> None:
        """Save the record, and with ``maps`` its region maps in the same transaction."""
        with transaction(self._db):
            self._upsert(rec)
            if maps is not None:
                self._save_maps(rec.id, maps)

    def _upsert(self, rec: MirrorRecord) -> None:
        # Not INSERT OR REPLACE: that deletes the row first, and the delete
        # would cascade to the mirror's maps and intents.
        self._db.execute(
            f"INSERT INTO mirrors ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "
            "ON CONFLICT(id) DO UPDATE SET name = excluded.name, "
            "source_uuid = excluded.source_uuid, target_uuid = excluded.target_uuid, "
            "state = excluded.state, created_at = excluded.created_at, "
            "split_at = excluded.split_at, target_access = excluded.target_access, "
            "op_total = excluded.op_total, reason = excluded.reason",
            (
                rec.id,
                rec.name,
                rec.source_uuid,
                rec.target_uuid,
                rec.state,
                rec.created_at,
                rec.split_at,
                rec.target_access,
                rec.op_total,
                rec.reason,
            ),
        )

    @guarded
    def mirrors(self) -> list[MirrorRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM mirrors ORDER BY created_at").fetchall()
        return [
            MirrorRecord(
                id=str(r[0]),
                name=str(r[1]),
                source_uuid=str(r[2]),
                target_uuid=str(r[3]),
                state=MirrorState(str(r[4])),
                created_at=float(r[5]),
                split_at=None if r[6] is None else float(r[6]),
                target_access=TargetAccess(str(r[7])),
                op_total=int(r[8]),
                reason=str(r[9]),
            )
            for r in rows
        ]

    @guarded
    def save_maps(
        self, mirror_id: str, maps: dict[str, ChangeMap], clear_intents: bool = False
    ) -> None:
        """Save the exact maps (and, with ``clear_intents``, empty the intent log
        they now cover) in one transaction: one durable commit per checkpoint."""
        with transaction(self._db):
            self._save_maps(mirror_id, maps)
            if clear_intents:
                self._db.execute("DELETE FROM mirror_intents WHERE mirror_id = ?", (mirror_id,))

    def _save_maps(self, mirror_id: str, maps: dict[str, ChangeMap]) -> None:
        self._db.executemany(
            "INSERT OR REPLACE INTO mirror_maps (mirror_id, side, size, map) VALUES (?, ?, ?, ?)",
            [(mirror_id, side, m.size, m.to_blob()) for side, m in maps.items()],
        )

    @guarded
    def log_intents(self, mirror_id: str, side: str, regions: list[int]) -> None:
        """Log intent regions in one transaction: one durable commit however many."""
        rows = [(mirror_id, side, region) for region in regions]
        with transaction(self._db):
            self._db.executemany(
                "INSERT OR IGNORE INTO mirror_intents (mirror_id, side, region) VALUES (?, ?, ?)",
                rows,
            )

    @guarded
    def load_maps(
        self, mirror_id: str, size: int
    ) -> tuple[dict[str, ChangeMap], set[tuple[str, int]]]:
        """The saved maps with every logged intent region marked, and the intents."""
        maps = {side: ChangeMap(size, GRANULARITY) for side in (SOURCE, TARGET)}
        for side, msize, blob in self._db.execute(
            "SELECT side, size, map FROM mirror_maps WHERE mirror_id = ?", (mirror_id,)
        ):
            maps[str(side)] = ChangeMap.from_blob(max(int(msize), size), GRANULARITY, bytes(blob))
        intents = {
            (str(side), int(region))
            for side, region in self._db.execute(
                "SELECT side, region FROM mirror_intents WHERE mirror_id = ?", (mirror_id,)
            )
        }
        for side, region in intents:
            start = region * INTENT_REGION
            maps[side].mark(start, max(0, min(INTENT_REGION, size - start)))
        return maps, intents

    @guarded
    def delete_mirror(self, mirror_id: str) -> None:
        self._db.execute("DELETE FROM mirrors WHERE id = ?", (mirror_id,))  # maps, intents cascade
