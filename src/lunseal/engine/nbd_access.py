"""Which NBD clients may open which export, read-only or read-write.

Kept in the catalog (table ``nbd_export_access``) and mirrored in memory, so
a negotiation on the event loop never waits for SQLite.  Every change is
saved first and adopted after, so a failing catalog leaves the ACL as it was.

A LUN with no entry may be opened by anyone (as before ACLs existed); once
it has one, only clients matching an entry may see or open it.  Entries are
kept by LUN UUID: a LUN deleted and re-created under the same name starts
open again rather than inheriting a stranger's list (the rows go with it).

A client is written ``cert:NAME`` (a TLS certificate's subject CN or SAN),
``net:ADDRESS[/PREFIX]`` (a TCP source address range, IPv4 or IPv6) or
``uid:N`` (the peer uid on the Unix socket).
"""

from __future__ import annotations

import ipaddress
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass

from lunseal.engine.sqlite_guard import guarded, transaction
from lunseal.errors import InvalidArgument, NotFound

#: Longest certificate name accepted (a DNS name is at most 253 bytes; CNs are
#: bounded by X.520 at 64; SAN URIs can be longer).
CERT_NAME_MAX = 255
UID_MAX = 2**32 - 2  # (uid_t)-1 means "no uid"

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class ClientSpec:
    """One parsed ACL entry's client: exactly one of the three is set."""

    cert: str | None = None
    network: IpNetwork | None = None
    uid: int | None = None

    def __str__(self) -> str:
        if self.cert is not None:
            return f"cert:{self.cert}"
        if self.network is not None:
            return f"net:{self.network}"
        return f"uid:{self.uid}"


def parse_client(text: str) -> ClientSpec:
    """``cert:NAME``, ``net:CIDR`` or ``uid:N``; a clear error otherwise."""
    kind, sep, value = text.strip().partition(":")
    kind = kind.lower()
    if not sep or kind not in ("cert", "net", "uid"):
        raise InvalidArgument(
            f"invalid NBD client {text[:80]!r}: use cert:NAME (TLS certificate CN or SAN), "
            "net:ADDRESS[/PREFIX] (TCP source range) or uid:N (Unix-socket peer uid)"
        )
    if kind == "cert":
        if not value or len(value.encode()) > CERT_NAME_MAX or not value.isprintable():
            raise InvalidArgument(
                f"invalid certificate name {value[:80]!r}: 1-{CERT_NAME_MAX} printable bytes"
            )
        return ClientSpec(cert=value)
    if kind == "net":
        try:
            # strict=False: 10.1.2.3/8 means 10.0.0.0/8, as ip route reads it.
            network = ipaddress.ip_network(value, strict=False)
        except ValueError as exc:
            raise InvalidArgument(f"invalid address range {value[:80]!r}: {exc}") from None
        return ClientSpec(network=network)
    if not value.isdigit() or int(value) > UID_MAX:
        raise InvalidArgument(f"invalid uid {value[:80]!r}: a number from 0 to {UID_MAX}")
    return ClientSpec(uid=int(value))


def parse_access(access: str) -> bool:
    """``ro``/``rw`` as read-only."""
    if access not in ("ro", "rw"):
        raise InvalidArgument(f"invalid NBD access {access!r}: use ro or rw")
    return access == "ro"


class NbdAccessStore:
    """The catalog's NBD export ACL, with an in-memory copy for negotiations.

    ``on_change`` callbacks get the LUN UUID after each change, so the NBD
    server can end connections that lost (or changed) their access.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._lock = threading.RLock()
        #: LUN UUID -> {client spec text: read-only}.
        self._acl: dict[str, dict[ClientSpec, bool]] = self._load()
        self.on_change: list[Callable[[str], None]] = []

    # -- reading (memory) -------------------------------------------------------------

    def entries(self, lun_uuid: str) -> dict[ClientSpec, bool]:
        """The LUN's entries (client -> read-only); empty: anyone may open it."""
        with self._lock:
            return dict(self._acl.get(lun_uuid, {}))

    def restricted(self) -> set[str]:
        """UUIDs of the LUNs that have entries."""
        with self._lock:
            return {uuid for uuid, acl in self._acl.items() if acl}

    # -- changing (catalog first) -------------------------------------------------------

    def allow(self, lun_uuid: str, client: str, access: str) -> bool:
        """Add or change an entry; True if anything changed."""
        spec, read_only = parse_client(client), parse_access(access)
        with self._lock:
            if self._acl.get(lun_uuid, {}).get(spec) == read_only:
                return False
            self._save(lun_uuid, spec, read_only)
            self._acl.setdefault(lun_uuid, {})[spec] = read_only
        self._changed(lun_uuid)
        return True

    def remove(self, lun_uuid: str, client: str) -> None:
        spec = parse_client(client)
        with self._lock:
            if spec not in self._acl.get(lun_uuid, {}):
                raise NotFound(f"no NBD access entry {spec} for this LUN")
            self._delete(lun_uuid, spec)
            del self._acl[lun_uuid][spec]
            if not self._acl[lun_uuid]:
                del self._acl[lun_uuid]
        self._changed(lun_uuid)

    def clear(self, lun_uuid: str) -> None:
        """Drop every entry: the LUN is open to anyone again."""
        with self._lock:
            if lun_uuid not in self._acl:
                return
            self._delete(lun_uuid, None)
            del self._acl[lun_uuid]
        self._changed(lun_uuid)

    def _changed(self, lun_uuid: str) -> None:
        for callback in list(self.on_change):
            callback(lun_uuid)

    # -- SQLite ------------------------------------------------------------------------------

    @guarded
    def _load(self) -> dict[str, dict[ClientSpec, bool]]:
        found: dict[str, dict[ClientSpec, bool]] = {}
        for uuid, client, read_only in self._db.execute(
            "SELECT lun_uuid, client, read_only FROM nbd_export_access"
        ).fetchall():
            found.setdefault(str(uuid), {})[parse_client(str(client))] = bool(read_only)
        return found

    @guarded
    def _save(self, lun_uuid: str, spec: ClientSpec, read_only: bool) -> None:
        with transaction(self._db):
            cur = self._db.execute(
                "INSERT INTO nbd_export_access (lun_uuid, client, read_only) "
                "SELECT uuid, ?, ? FROM luns WHERE uuid = ? "
                "ON CONFLICT(lun_uuid, client) DO UPDATE SET read_only = excluded.read_only",
                (str(spec), int(read_only), lun_uuid),
            )
            if cur.rowcount == 0:
                raise NotFound(f"no LUN with UUID {lun_uuid}")

    @guarded
    def _delete(self, lun_uuid: str, spec: ClientSpec | None) -> None:
        with transaction(self._db):
            if spec is None:
                self._db.execute("DELETE FROM nbd_export_access WHERE lun_uuid = ?", (lun_uuid,))
            else:
                self._db.execute(
                    "DELETE FROM nbd_export_access WHERE lun_uuid = ? AND client = ?",
                    (lun_uuid, str(spec)),
                )
