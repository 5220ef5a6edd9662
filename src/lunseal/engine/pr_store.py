"""SQLite persistence of SCSI persistent reservations (SPC-4 5.13), per LUN.

The tables are defined by the catalog's migrations (schema step 4); a LUN's
registrations and reservation go with it (foreign keys, ``ON DELETE CASCADE``).
The SCSI rules live in :mod:`lunseal.frontends.scsi.reservations`; this module
only stores what they decided, so it knows nothing of SCSI beyond the record.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from lunseal.engine.sqlite_guard import guarded, transaction

#: An I_T nexus: (initiator port name, target port name).
ItNexus = tuple[str, str]

_U64 = 1 << 64
_I64_MAX = (1 << 63) - 1


@dataclass(frozen=True)
class Registration:
    """One I_T nexus registered with a reservation key."""

    initiator_port: str
    target_port: str
    key: int

    @property
    def nexus(self) -> ItNexus:
        return (self.initiator_port, self.target_port)


@dataclass(frozen=True)
class PrRecord:
    """A LUN's persistent-reservation state, as the catalog keeps it."""

    generation: int = 0
    #: In the order they were made (READ KEYS lists them so).
    registrations: tuple[Registration, ...] = ()
    #: The reservation's type (SPC-4 table 180); ``None``: not reserved.
    type: int | None = None
    #: The I_T nexus holding it; ``None`` for the all-registrants types, whose
    #: holders are every registered I_T nexus.
    holder: ItNexus | None = None
    #: The APTPL bit of the last successful registration: keep the state
    #: through a loss of power (an unclean stop of the array).
    aptpl: bool = False


def _to_sql(key: int) -> int:
    # Reservation keys are unsigned 64-bit; SQLite integers are signed.
    return key - _U64 if key > _I64_MAX else key


def _from_sql(value: object) -> int:
    key = int(str(value))
    return key + _U64 if key < 0 else key


class SqlitePrStore:
    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    @guarded
    def load_all(self) -> dict[str, PrRecord]:
        """Every LUN's recorded state, by LUN UUID (LUNs with none are absent)."""
        regs: dict[str, list[Registration]] = {}
        # rowid order is the order :meth:`save` inserted them: registration order.
        for uuid, port, target, key in self._db.execute(
            "SELECT lun_uuid, initiator_port, target_port, key FROM scsi_pr_registrations "
            "ORDER BY rowid"
        ).fetchall():
            regs.setdefault(str(uuid), []).append(
                Registration(str(port), str(target), _from_sql(key))
            )
        records = {uuid: PrRecord(registrations=tuple(r)) for uuid, r in regs.items()}
        for uuid, generation, port, target, type_, aptpl in self._db.execute(
            "SELECT lun_uuid, generation, holder_port, holder_target, type, aptpl "
            "FROM scsi_pr_state"
        ).fetchall():
            records[str(uuid)] = PrRecord(
                generation=int(generation),
                registrations=records.get(str(uuid), PrRecord()).registrations,
                type=None if type_ is None else int(type_),
                holder=None if port is None else (str(port), str(target)),
                aptpl=bool(aptpl),
            )
        return records

    @guarded
    def save(self, lun_uuid: str, rec: PrRecord) -> None:
        """Replace the LUN's state with ``rec``, in one transaction."""
        with transaction(self._db):
            self._db.execute("DELETE FROM scsi_pr_registrations WHERE lun_uuid = ?", (lun_uuid,))
            self._db.executemany(
                "INSERT INTO scsi_pr_registrations (lun_uuid, initiator_port, target_port, key) "
                "VALUES (?, ?, ?, ?)",
                [
                    (lun_uuid, r.initiator_port, r.target_port, _to_sql(r.key))
                    for r in rec.registrations
                ],
            )
            holder = rec.holder or (None, None)
            self._db.execute(
                "INSERT INTO scsi_pr_state "
                "(lun_uuid, generation, holder_port, holder_target, type, aptpl) "
                "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT(lun_uuid) DO UPDATE SET "
                "generation = excluded.generation, holder_port = excluded.holder_port, "
                "holder_target = excluded.holder_target, type = excluded.type, "
                "aptpl = excluded.aptpl",
                (lun_uuid, rec.generation, holder[0], holder[1], rec.type, int(rec.aptpl)),
            )

    @guarded
    def drop_volatile(self) -> int:
        """Forget the state of every LUN whose last APTPL bit was zero (what a
        loss of power does to it, SPC-4 5.13.5); returns how many LUNs lost some."""
        with transaction(self._db):
            volatile = {
                str(row[0])
                for row in self._db.execute(
                    "SELECT lun_uuid FROM scsi_pr_registrations WHERE lun_uuid NOT IN "
                    "(SELECT lun_uuid FROM scsi_pr_state WHERE aptpl = 1) "
                    "UNION SELECT lun_uuid FROM scsi_pr_state WHERE aptpl = 0"
                ).fetchall()
            }
            for uuid in volatile:
                self._db.execute("DELETE FROM scsi_pr_registrations WHERE lun_uuid = ?", (uuid,))
                self._db.execute("DELETE FROM scsi_pr_state WHERE lun_uuid = ?", (uuid,))
        return len(volatile)
