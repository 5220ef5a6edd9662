"""Which iSCSI initiators may log in, with which CHAP secrets, seeing which LUNs.

Kept in the catalog (tables ``iscsi_initiators`` and ``iscsi_lun_access``) and
mirrored in memory, so a login (on the event loop) never waits for SQLite.
Every change is saved first and adopted after, so a failing catalog leaves the
ACL as it was.

An initiator either sees every LUN (``all_luns``; the LUNs listed are then
the read-only ones) or only the LUNs listed, each read-only or read-write.
LUNs are kept by UUID: a LUN deleted and re-created under the same name does
not inherit the old one's access (the rows go with the LUN).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from lunseal.engine.sqlite_guard import guarded, transaction
from lunseal.errors import Conflict, InvalidArgument, NotFound

#: RFC 7143 4.2.7.1: at most 223 bytes.
NAME_MAX = 223
_IQN_RE = re.compile(
    r"iqn\.[0-9]{4}-(0[1-9]|1[0-2])"  # the date the naming authority owned its domain
    r"\.[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*"  # reversed domain
    r"(:[a-z0-9._:-]+)?"  # the authority's own part
)
_EUI_RE = re.compile(r"eui\.[0-9a-f]{16}")
_NAA_RE = re.compile(r"naa\.([0-9a-f]{16}|[0-9a-f]{32})")

#: RFC 7143 9.2.1: secrets of at least 12 bytes (96 bits); CHAP itself needs
#: none longer than a few hundred, and a bound keeps the catalog row small.
SECRET_MIN = 12
SECRET_MAX = 255
CHAP_NAME_MAX = 255


def validate_iscsi_name(name: str) -> str:
    """An iSCSI name (iqn., eui. or naa. format), normalised to lower case as
    RFC 7143 4.2.7 compares them."""
    norm = name.strip().lower()
    if len(norm.encode()) > NAME_MAX or not (
        _IQN_RE.fullmatch(norm) or _EUI_RE.fullmatch(norm) or _NAA_RE.fullmatch(norm)
    ):
        raise InvalidArgument(
            f"invalid iSCSI name {name[:80]!r}: use iqn.YYYY-MM.reversed.domain[:name] "
            f"(letters, digits, '.', '-', ':', '_'), eui.<16 hex digits> or naa.<16 or 32 "
            f"hex digits>, at most {NAME_MAX} bytes"
        )
    return norm


def validate_chap_name(user: str) -> str:
    if not user or len(user.encode()) > CHAP_NAME_MAX or not user.isprintable():
        raise InvalidArgument(
            f"invalid CHAP user name {user[:40]!r}: 1-{CHAP_NAME_MAX} printable bytes"
        )
    return user


def validate_secret(secret: str, what: str = "CHAP secret") -> str:
    size = len(secret.encode())
    if size < SECRET_MIN:
        raise InvalidArgument(
            f"{what} is {size} bytes: use at least {SECRET_MIN} (RFC 7143 asks for 96 bits or more)"
        )
    if size > SECRET_MAX or not secret.isprintable():
        raise InvalidArgument(f"{what} must be at most {SECRET_MAX} printable bytes")
    return secret


@dataclass(frozen=True)
class Chap:
    user: str
    secret: str


@dataclass(frozen=True)
class InitiatorRecord:
    name: str
    created_at: float
    all_luns: bool = True
    #: LUN UUID -> read-only.  With ``all_luns`` only read-only entries matter.
    luns: dict[str, bool] = field(default_factory=dict)
    #: The initiator proves itself with this (one-way CHAP).
    chap: Chap | None = None
    #: The target proves itself with this (mutual CHAP; needs ``chap``).
    mutual: Chap | None = None


def check_chap(chap: Chap | None, mutual: Chap | None) -> None:
    """A CHAP configuration the target can use (RFC 7143 9.2.1)."""
    if chap is not None:
        validate_chap_name(chap.user)
        validate_secret(chap.secret)
    if mutual is None:
        return
    if chap is None:
        raise InvalidArgument(
            "mutual CHAP needs one-way CHAP too (the initiator proves itself first)"
        )
    validate_chap_name(mutual.user)
    validate_secret(mutual.secret, "mutual CHAP secret")
    if mutual.secret == chap.secret:
        raise InvalidArgument(
            "the mutual CHAP secret must differ from the initiator's secret (RFC 7143 9.2.1)"
        )


class IscsiAclStore:
    """The catalog's ACL tables, with an in-memory copy for logins.

    ``on_change`` callbacks get the initiator name after each change, so a
    transport can end sessions that lost their access.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.RLock()
        self._initiators: dict[str, InitiatorRecord] = self._load()
        self.on_change: list[Callable[[str], None]] = []

    # -- reading (memory) -------------------------------------------------------------

    @property
    def configured(self) -> bool:
        """Any initiator configured: only configured ones may log in."""
        return bool(self._initiators)

    def initiators(self) -> list[InitiatorRecord]:
        with self._lock:
            return sorted(self._initiators.values(), key=lambda r: r.name)

    def get(self, name: str) -> InitiatorRecord | None:
        with self._lock:
            return self._initiators.get(name.strip().lower())

    def require(self, name: str) -> InitiatorRecord:
        rec = self.get(name)
        if rec is None:
            raise NotFound(f"no iSCSI initiator {name!r} is configured")
        return rec

    # -- changing (catalog first) -------------------------------------------------------------

    def put(self, rec: InitiatorRecord) -> bool:
        """Create or replace an initiator; True if it is new."""
        check_chap(rec.chap, rec.mutual)
        rec = replace(rec, name=validate_iscsi_name(rec.name))
        with self._lock:
            old = self._initiators.get(rec.name)
            created = old.created_at if old is not None else rec.created_at or time.time()
            rec = replace(rec, created_at=created)
            if rec == old:
                return False  # nothing changes: its sessions may carry on
            # LUNs deleted meanwhile are dropped: their rows went with them.
            rec = replace(rec, luns=self._save(rec))
            self._initiators[rec.name] = rec
        self._changed(rec.name)
        return old is None

    def delete(self, name: str) -> None:
        with self._lock:
            rec = self.require(name)
            self._delete(rec.name)
            del self._initiators[rec.name]
        self._changed(rec.name)

    def set_lun(self, name: str, lun_uuid: str, access: str) -> InitiatorRecord:
        """``access``: ro, rw or none (the LUN is not listed for it)."""
        if access not in ("ro", "rw", "none"):
            raise InvalidArgument(f"invalid LUN access {access!r}: use ro, rw or none")
        with self._lock:
            rec = self.require(name)
            luns = dict(rec.luns)
            if access == "none":
                if rec.all_luns:
                    raise Conflict(
                        f"initiator {rec.name} sees every LUN; to hide one, list the LUNs it "
                        "may see (lunseal iscsi allow NAME --lun LUN ...)"
                    )
                luns.pop(lun_uuid, None)
            elif rec.all_luns and access == "rw":
                luns.pop(lun_uuid, None)  # every LUN is read-write unless listed read-only
            else:
                luns[lun_uuid] = access == "ro"
            return self._replace(replace(rec, luns=luns))

    def set_chap(self, name: str, chap: Chap | None, mutual: Chap | None) -> InitiatorRecord:
        with self._lock:
            return self._replace(replace(self.require(name), chap=chap, mutual=mutual))

    def _replace(self, rec: InitiatorRecord) -> InitiatorRecord:
        self.put(rec)
        return self.require(rec.name)

    def _changed(self, name: str) -> None:
        for callback in list(self.on_change):
            callback(name)

    # -- SQLite ------------------------------------------------------------------------------

    @guarded
    def _load(self) -> dict[str, InitiatorRecord]:
        access: dict[str, dict[str, bool]] = {}
        for initiator, uuid, read_only in self._db.execute(
            "SELECT initiator, lun_uuid, read_only FROM iscsi_lun_access"
        ).fetchall():
            access.setdefault(str(initiator), {})[str(uuid)] = bool(read_only)
        found: dict[str, InitiatorRecord] = {}
        for row in self._db.execute(
            "SELECT name, chap_user, chap_secret, mutual_user, mutual_secret, all_luns, "
            "created_at FROM iscsi_initiators"
        ).fetchall():
            name, cu, cs, mu, ms, all_luns, created = row
            found[str(name)] = InitiatorRecord(
                name=str(name),
                created_at=float(created),
                all_luns=bool(all_luns),
                luns=access.get(str(name), {}),
                chap=None if cu is None else Chap(str(cu), str(cs)),
                mutual=None if mu is None else Chap(str(mu), str(ms)),
            )
        return found

    @guarded
    def _save(self, rec: InitiatorRecord) -> dict[str, bool]:
        """Save ``rec``; returns its LUN access as stored (existing LUNs only)."""
        chap = rec.chap or Chap("", "")
        mutual = rec.mutual or Chap("", "")
        with transaction(self._db):
            self._db.execute(
                "INSERT INTO iscsi_initiators (name, chap_user, chap_secret, mutual_user, "
                "mutual_secret, all_luns, created_at) VALUES (?, ?, ?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET chap_user = excluded.chap_user, "
                "chap_secret = excluded.chap_secret, mutual_user = excluded.mutual_user, "
                "mutual_secret = excluded.mutual_secret, all_luns = excluded.all_luns",
                (
                    rec.name,
                    chap.user or None,
                    chap.secret or None,
                    mutual.user or None,
                    mutual.secret or None,
                    int(rec.all_luns),
                    rec.created_at,
                ),
            )
            self._db.execute("DELETE FROM iscsi_lun_access WHERE initiator = ?", (rec.name,))
            self._db.executemany(
                "INSERT INTO iscsi_lun_access (initiator, lun_uuid, read_only) "
                "SELECT ?, uuid, ? FROM luns WHERE uuid = ?",
                [(rec.name, int(ro), uuid) for uuid, ro in rec.luns.items()],
            )
            rows = self._db.execute(
                "SELECT lun_uuid, read_only FROM iscsi_lun_access WHERE initiator = ?",
                (rec.name,),
            ).fetchall()
        return {str(uuid): bool(ro) for uuid, ro in rows}

    @guarded
    def _delete(self, name: str) -> None:
        self._db.execute("DELETE FROM iscsi_initiators WHERE name = ?", (name,))
