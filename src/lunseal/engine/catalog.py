"""The SQLite catalog: everything that must survive a restart.

One database file in the data directory, WAL mode, ``synchronous=FULL``:
catalog changes are rare management operations, so every commit is durable.

The schema lives here and only here, as an ordered list of migration steps;
``PRAGMA user_version`` says how many have run.  Each step runs in one
transaction together with its version bump, so a crash during an upgrade
leaves the catalog at the old version, never half-way.  A new catalog runs
every step, so the upgrade path is the path every catalog takes.  To change
the schema, append a step (never edit one that has shipped).
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from lunseal.engine.access import ApiTokenStore, AuditStore
from lunseal.engine.iscsi_acl import IscsiAclStore
from lunseal.engine.lun import LunRecord
from lunseal.engine.mirror.store import SqliteMirrorStore
from lunseal.engine.nbd_access import NbdAccessStore
from lunseal.engine.pr_store import SqlitePrStore
from lunseal.engine.sqlite_guard import LockedConnection, guarded, transaction
from lunseal.engine.state.store import SqliteStateStore
from lunseal.errors import CatalogError, LunsealError

log = logging.getLogger(__name__)

Step = Callable[[sqlite3.Connection], None]


def _run(db: sqlite3.Connection, script: str) -> None:
    # Not executescript: it commits first, and a step must stay one transaction.
    for statement in script.split(";"):
        if statement.strip():
            db.execute(statement)


def _step1_tables(db: sqlite3.Connection) -> None:
    """Schema 1: LUNs, their states and holds, mirrors (epochs counted as integers).

    ``IF NOT EXISTS`` because catalogs written before ``user_version`` was used
    may lack the tables of features added later (they were created on open).
    """
    _run(
        db,
        """
        CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS luns (
            uuid TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, number INTEGER NOT NULL UNIQUE,
            size INTEGER NOT NULL, backend TEXT NOT NULL, path TEXT NOT NULL,
            owned INTEGER NOT NULL, read_only INTEGER NOT NULL, created_at REAL NOT NULL);
        CREATE TABLE IF NOT EXISTS lun_state (
            lun_uuid TEXT PRIMARY KEY, mode TEXT NOT NULL, epoch INTEGER NOT NULL,
            value TEXT NOT NULL, flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp TEXT,
            epoch_reason TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS holds (
            lun_uuid TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
            token TEXT NOT NULL, granularity INTEGER, map_size INTEGER, map BLOB,
            PRIMARY KEY (lun_uuid, name));
        CREATE TABLE IF NOT EXISTS mirrors (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, source_uuid TEXT NOT NULL,
            target_uuid TEXT NOT NULL UNIQUE, state TEXT NOT NULL, created_at REAL NOT NULL,
            split_at REAL, target_access TEXT NOT NULL, op_total INTEGER NOT NULL,
            reason TEXT NOT NULL);
        CREATE TABLE IF NOT EXISTS mirror_maps (
            mirror_id TEXT NOT NULL, side TEXT NOT NULL, size INTEGER NOT NULL,
            map BLOB NOT NULL, PRIMARY KEY (mirror_id, side));
        CREATE TABLE IF NOT EXISTS mirror_intents (
            mirror_id TEXT NOT NULL, side TEXT NOT NULL, region INTEGER NOT NULL,
            PRIMARY KEY (mirror_id, side, region));
        """,
    )


def _step2_text_epochs(db: sqlite3.Connection) -> None:
    """Schema 2: epochs are random text with a history.  Old counters keep their
    decimal form, so tokens issued before the upgrade still check; a column of
    INTEGER affinity would turn an all-digit hex epoch into a number."""
    _run(
        db,
        """
        CREATE TABLE lun_state_v2 (
            lun_uuid TEXT PRIMARY KEY, mode TEXT NOT NULL, epoch TEXT NOT NULL,
            value TEXT NOT NULL, flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp TEXT,
            epoch_reason TEXT NOT NULL, epoch_history TEXT NOT NULL DEFAULT '[]');
        INSERT INTO lun_state_v2 (lun_uuid, mode, epoch, value, flag, clean, stamp,
            epoch_reason)
            SELECT lun_uuid, mode, CAST(epoch AS TEXT), value, flag, clean, stamp,
                epoch_reason FROM lun_state;
        DROP TABLE lun_state;
        ALTER TABLE lun_state_v2 RENAME TO lun_state
        """,
    )


#: Schema 3: foreign keys.  A LUN's state and holds go with it; a mirror keeps
#: its LUNs (the array deletes a LUN's mirrors first, or refuses); maps and
#: intents go with their mirror.  Rows that already lost their parent (a crash
#: between the separate deletes of older versions) are dropped on the way.
_STEP3_TABLES = {
    "lun_state": (
        """CREATE TABLE lun_state (
            lun_uuid TEXT PRIMARY KEY REFERENCES luns (uuid) ON DELETE CASCADE,
            mode TEXT NOT NULL, epoch TEXT NOT NULL, value TEXT NOT NULL,
            flag INTEGER NOT NULL, clean INTEGER NOT NULL, stamp TEXT,
            epoch_reason TEXT NOT NULL, epoch_history TEXT NOT NULL DEFAULT '[]')""",
        "lun_uuid IN (SELECT uuid FROM luns)",
    ),
    "holds": (
        """CREATE TABLE holds (
            lun_uuid TEXT NOT NULL REFERENCES luns (uuid) ON DELETE CASCADE,
            name TEXT NOT NULL, created_at REAL NOT NULL, token TEXT NOT NULL,
            granularity INTEGER, map_size INTEGER, map BLOB,
            PRIMARY KEY (lun_uuid, name))""",
        "lun_uuid IN (SELECT uuid FROM luns)",
    ),
    "mirrors": (
        """CREATE TABLE mirrors (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE,
            source_uuid TEXT NOT NULL REFERENCES luns (uuid) ON DELETE RESTRICT,
            target_uuid TEXT NOT NULL UNIQUE REFERENCES luns (uuid) ON DELETE RESTRICT,
            state TEXT NOT NULL, created_at REAL NOT NULL, split_at REAL,
            target_access TEXT NOT NULL, op_total INTEGER NOT NULL, reason TEXT NOT NULL)""",
        "source_uuid IN (SELECT uuid FROM luns) AND target_uuid IN (SELECT uuid FROM luns)",
    ),
    "mirror_maps": (
        """CREATE TABLE mirror_maps (
            mirror_id TEXT NOT NULL REFERENCES mirrors (id) ON DELETE CASCADE,
            side TEXT NOT NULL, size INTEGER NOT NULL, map BLOB NOT NULL,
            PRIMARY KEY (mirror_id, side))""",
        "mirror_id IN (SELECT id FROM mirrors)",
    ),
    "mirror_intents": (
        """CREATE TABLE mirror_intents (
            mirror_id TEXT NOT NULL REFERENCES mirrors (id) ON DELETE CASCADE,
            side TEXT NOT NULL, region INTEGER NOT NULL,
            PRIMARY KEY (mirror_id, side, region))""",
        "mirror_id IN (SELECT id FROM mirrors)",
    ),
}


def _step3_foreign_keys(db: sqlite3.Connection) -> None:
    # SQLite cannot add a constraint to a table: rebuild each one.  The old
    # tables are renamed first, so the new ones are created under their final
    # names (renaming a table later would rewrite references to it).
    for table in _STEP3_TABLES:
        db.execute(f"ALTER TABLE {table} RENAME TO {table}_v2")
    for table, (ddl, keep) in _STEP3_TABLES.items():  # parents before children
        db.execute(ddl)
        columns = ", ".join(
            str(row[1]) for row in db.execute(f"PRAGMA table_info({table}_v2)").fetchall()
        )
        db.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_v2 WHERE {keep}")
        dropped = db.execute(f"SELECT count(*) FROM {table}_v2 WHERE NOT ({keep})").fetchone()[0]
        if dropped:
            log.warning(
                "catalog upgrade: dropped %d %s row(s) whose LUN or mirror is gone", dropped, table
            )
    for table in reversed(_STEP3_TABLES):
        db.execute(f"DROP TABLE {table}_v2")
    db.execute("CREATE INDEX mirrors_source ON mirrors (source_uuid)")
    # The version lives in user_version from now on.
    db.execute("DELETE FROM meta WHERE key = 'schema_version'")


def _step4_scsi(db: sqlite3.Connection) -> None:
    """Schema 4: the iSCSI target's initiator ACLs and CHAP secrets, and SCSI
    persistent reservations (which must survive a restart).  CHAP needs the
    secret itself, so it is stored as given; the catalog is readable by the
    array's user only."""
    _run(
        db,
        """
        CREATE TABLE iscsi_initiators (
            name TEXT PRIMARY KEY, chap_user TEXT, chap_secret TEXT,
            mutual_user TEXT, mutual_secret TEXT, all_luns INTEGER NOT NULL,
            created_at REAL NOT NULL);
        CREATE TABLE iscsi_lun_access (
            initiator TEXT NOT NULL REFERENCES iscsi_initiators (name) ON DELETE CASCADE,
            lun_uuid TEXT NOT NULL REFERENCES luns (uuid) ON DELETE CASCADE,
            read_only INTEGER NOT NULL, PRIMARY KEY (initiator, lun_uuid));
        CREATE TABLE scsi_pr_registrations (
            lun_uuid TEXT NOT NULL REFERENCES luns (uuid) ON DELETE CASCADE,
            initiator_port TEXT NOT NULL, target_port TEXT NOT NULL, key INTEGER NOT NULL,
            PRIMARY KEY (lun_uuid, initiator_port, target_port));
        CREATE TABLE scsi_pr_state (
            lun_uuid TEXT PRIMARY KEY REFERENCES luns (uuid) ON DELETE CASCADE,
            generation INTEGER NOT NULL, holder_port TEXT, holder_target TEXT,
            type INTEGER, aptpl INTEGER NOT NULL DEFAULT 0)
        """,
    )


def _step5_access(db: sqlite3.Connection) -> None:
    """Schema 5: API tokens with roles (stored hashed), the audit trail, and
    which NBD clients may open which export."""
    _run(
        db,
        """
        CREATE TABLE api_tokens (
            id TEXT PRIMARY KEY, name TEXT NOT NULL UNIQUE, role TEXT NOT NULL,
            hash TEXT NOT NULL, created_at REAL NOT NULL, last_used REAL);
        CREATE TABLE audit (
            seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
            action TEXT NOT NULL, target TEXT NOT NULL, result TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT '');
        CREATE INDEX audit_at ON audit (at);
        CREATE TABLE nbd_export_access (
            lun_uuid TEXT NOT NULL REFERENCES luns (uuid) ON DELETE CASCADE,
            client TEXT NOT NULL, read_only INTEGER NOT NULL,
            PRIMARY KEY (lun_uuid, client))
        """,
    )


#: Step ``i`` takes the catalog from version ``i`` to ``i + 1``.
STEPS: tuple[Step, ...] = (
    _step1_tables,
    _step2_text_epochs,
    _step3_foreign_keys,
    _step4_scsi,
    _step5_access,
)
SCHEMA_VERSION = len(STEPS)


def schema_version(db: sqlite3.Connection) -> int:
    """The catalog's version; catalogs before schema 3 kept it in ``meta``."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version:
        return version
    if db.execute("SELECT 1 FROM sqlite_master WHERE name = 'meta'").fetchone() is None:
        return 0
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return 1 if row is None else int(row[0])


def migrate(db: sqlite3.Connection, path: Path | str = "catalog") -> None:
    """Bring the catalog to :data:`SCHEMA_VERSION`, one transaction per step."""
    version = schema_version(db)
    if version > SCHEMA_VERSION:
        raise LunsealError(
            f"catalog {path} has schema version {version}, newer than this "
            f"lunseal ({SCHEMA_VERSION}); upgrade lunseal"
        )
    if version and not int(db.execute("PRAGMA user_version").fetchone()[0]):
        # A catalog of the meta era: fill in tables it may lack, adopt its version.
        with transaction(db):
            _step1_tables(db)
            db.execute(f"PRAGMA user_version = {version}")
    for target in range(version + 1, SCHEMA_VERSION + 1):
        try:
            with transaction(db):
                STEPS[target - 1](db)
                db.execute(f"PRAGMA user_version = {target}")
        except sqlite3.Error as exc:
            raise CatalogError(
                f"catalog {path}: upgrade to schema {target} failed: {exc} (the catalog "
                f"was left at schema {target - 1})"
            ) from exc
        if version:  # a new catalog is created, not upgraded
            log.info("catalog %s upgraded to schema %d", path, target)


_LUN_COLUMNS = "uuid, name, number, size, backend, path, owned, read_only, created_at"


class Catalog:
    def __init__(self, path: Path) -> None:
        self.path = path
        _owner_only(path)
        # One connection for every thread; guarded calls serialise on its lock.
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, factory=LockedConnection
        )
        try:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
            migrate(self._db, path)
            self.states = SqliteStateStore(self._db)
            self.mirrors = SqliteMirrorStore(self._db)
            self.reservations = SqlitePrStore(self._db)
            self.iscsi_acl = IscsiAclStore(self._db)
            self.api_tokens = ApiTokenStore(self._db)
            self.audit = AuditStore(self._db)
            self.nbd_access = NbdAccessStore(self._db)
        except BaseException:
            self._db.close()  # e.g. a newer schema: do not leave the database open
            raise

    @property
    def schema_version(self) -> int:
        return schema_version(self._db)

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


def _owner_only(path: Path) -> None:
    """The catalog holds CHAP secrets: readable by the array's user only.  SQLite
    gives its -wal and -shm files the database's mode; older ones are fixed here."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    for suffix in ("-wal", "-shm"):
        side = path.with_name(path.name + suffix)
        if side.exists():
            side.chmod(0o600)


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
