"""SQLite persistence of mirrors, their region maps and intent logs."""

from __future__ import annotations

import sqlite3

from lunseal.engine.changemap import ChangeMap
from lunseal.engine.mirror import GRANULARITY, INTENT_REGION, SOURCE, TARGET, MirrorRecord

SCHEMA = """
CREATE TABLE IF NOT EXISTS mirrors (
    id            TEXT PRIMARY KEY,
    name          TEXT NOT NULL UNIQUE,
    source_uuid   TEXT NOT NULL,
    target_uuid   TEXT NOT NULL UNIQUE,
    state         TEXT NOT NULL,
    created_at    REAL NOT NULL,
    split_at      REAL,
    target_access TEXT NOT NULL,
    op_total      INTEGER NOT NULL,
    reason        TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS mirror_maps (
    mirror_id TEXT NOT NULL,
    side      TEXT NOT NULL,
    size      INTEGER NOT NULL,
    map       BLOB NOT NULL,
    PRIMARY KEY (mirror_id, side)
);
CREATE TABLE IF NOT EXISTS mirror_intents (
    mirror_id TEXT NOT NULL,
    side      TEXT NOT NULL,
    region    INTEGER NOT NULL,
    PRIMARY KEY (mirror_id, side, region)
);
"""

_COLUMNS = (
    "id, name, source_uuid, target_uuid, state, created_at, split_at, target_access, "
    "op_total, reason"
)


class SqliteMirrorStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        with db:
            db.executescript(SCHEMA)

    def save_mirror(self, rec: MirrorRecord) -> None:
        self._db.execute(
            f"INSERT OR REPLACE INTO mirrors ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
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

    def mirrors(self) -> list[MirrorRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM mirrors ORDER BY created_at").fetchall()
        return [
            MirrorRecord(
                id=str(r[0]),
                name=str(r[1]),
                source_uuid=str(r[2]),
                target_uuid=str(r[3]),
                state=str(r[4]),
                created_at=float(r[5]),
                split_at=None if r[6] is None else float(r[6]),
                target_access=str(r[7]),
                op_total=int(r[8]),
                reason=str(r[9]),
            )
            for r in rows
        ]

    def save_maps(
        self, mirror_id: str, maps: dict[str, ChangeMap], clear_intents: bool = False
    ) -> None:
        """Save the exact maps (and, with ``clear_intents``, empty the intent log
        they now cover) in one transaction: one durable commit per checkpoint."""
        rows = [(mirror_id, side, m.size, m.to_blob()) for side, m in maps.items()]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR REPLACE INTO mirror_maps (mirror_id, side, size, map) "
                "VALUES (?, ?, ?, ?)",
                rows,
            )
            if clear_intents:
                self._db.execute("DELETE FROM mirror_intents WHERE mirror_id = ?", (mirror_id,))
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def log_intents(self, mirror_id: str, side: str, regions: list[int]) -> None:
        """Log intent regions in one transaction: one durable commit however many."""
        rows = [(mirror_id, side, region) for region in regions]
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(
                "INSERT OR IGNORE INTO mirror_intents (mirror_id, side, region) VALUES (?, ?, ?)",
                rows,
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

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

    def delete_mirror(self, mirror_id: str) -> None:
        with self._db:
            for table, column in (
                ("mirrors", "id"),
                ("mirror_maps", "mirror_id"),
                ("mirror_intents", "mirror_id"),
            ):
                self._db.execute(f"DELETE FROM {table} WHERE {column} = ?", (mirror_id,))
