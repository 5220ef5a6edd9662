"""Who may manage the array (API tokens with roles) and what they did (the audit trail).

Tables ``api_tokens`` and ``audit`` of the catalog.  A token is 32 random
bytes; only a salted BLAKE2b digest of it is stored, which is enough for a
secret with that much entropy (no slow KDF needed).  A token reads
``lst1.<id>.<secret>``: the id finds its row without trying every digest.

The audit trail keeps the newest :data:`AUDIT_MAX_ROWS` rows, none older than
:data:`AUDIT_MAX_AGE`; older ones are pruned on insert, so it stays bounded
whatever a client sends.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import time
from dataclasses import dataclass

from lunseal.engine.sqlite_guard import guarded, transaction
from lunseal.errors import Conflict, InvalidArgument, NotFound

audit_log = logging.getLogger("lunseal.audit")

AUDIT_MAX_ROWS = 100_000
AUDIT_MAX_AGE = 90 * 86400.0
#: The first-start token of ``HOME/api-token`` acts under this name; no stored token may.
BOOTSTRAP_NAME = "admin"
_PREFIX = "lst1"
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
#: Free text from clients (paths, error messages) is cut to this in the trail.
_TEXT_MAX = 500


class Role(enum.IntEnum):
    """Each role may do everything the ones below it may."""

    MONITOR = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()

    @classmethod
    def parse(cls, text: str) -> Role:
        try:
            return cls[text.strip().upper()]
        except KeyError:
            raise InvalidArgument(
                f"invalid role {text[:40]!r}: use admin, operator or monitor"
            ) from None


@dataclass(frozen=True)
class Principal:
    """Who a request comes from: a token's name and role."""

    name: str
    role: Role


@dataclass(frozen=True)
class TokenRecord:
    name: str
    role: Role
    created_at: float
    last_used: float | None


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: float
    actor: str
    action: str
    target: str
    result: str
    detail: str


def validate_token_name(name: str) -> str:
    if not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid token name {name[:80]!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    if name == BOOTSTRAP_NAME:
        raise InvalidArgument(
            f"token name {BOOTSTRAP_NAME!r} is the first-start token of the data directory"
        )
    return name


def _digest(salt: bytes, secret: str) -> str:
    return hashlib.blake2b(secret.encode(), key=salt, digest_size=32).hexdigest()


class ApiTokenStore:
    """Named API tokens; the catalog keeps only their salted digests."""

    #: ``last_used`` is written at most this often per token (it is a hint, not a log).
    LAST_USED_EVERY = 60.0

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db
        self._written: dict[str, float] = {}

    def create(self, name: str, role: Role) -> str:
        """A new token's secret: shown once, never stored."""
        validate_token_name(name)
        token_id = secrets.token_hex(8)
        secret = f"{_PREFIX}.{token_id}.{secrets.token_urlsafe(32)}"
        salt = secrets.token_bytes(16)
        stored = f"{salt.hex()}${_digest(salt, secret)}"
        try:
            self._insert(token_id, name, role, stored)
        except sqlite3.IntegrityError:
            raise Conflict(f"an API token named {name!r} exists (revoke it first)") from None
        return secret

    def authenticate(self, secret: str) -> Principal | None:
        parts = secret.split(".")
        if len(parts) != 3 or parts[0] != _PREFIX or len(secret) > 200:
            return None
        row = self._row(parts[1])
        if row is None:
            return None
        name, role, stored = row
        salt_hex, _, digest = stored.partition("$")
        if not hmac.compare_digest(_digest(bytes.fromhex(salt_hex), secret), digest):
            return None
        self._touch(parts[1])
        return Principal(name, Role(role))

    def _touch(self, token_id: str) -> None:
        now = time.time()
        if now - self._written.get(token_id, 0.0) >= self.LAST_USED_EVERY:
            self._written[token_id] = now
            self._set_last_used(token_id, now)

    @guarded
    def _insert(self, token_id: str, name: str, role: Role, stored: str) -> None:
        self._db.execute(
            "INSERT INTO api_tokens (id, name, role, hash, created_at) VALUES (?, ?, ?, ?, ?)",
            (token_id, name, role.label, stored, time.time()),
        )

    @guarded
    def _row(self, token_id: str) -> tuple[str, int, str] | None:
        row = self._db.execute(
            "SELECT name, role, hash FROM api_tokens WHERE id = ?", (token_id,)
        ).fetchone()
        if row is None:
            return None
        return str(row[0]), int(Role.parse(str(row[1]))), str(row[2])

    @guarded
    def _set_last_used(self, token_id: str, now: float) -> None:
        self._db.execute("UPDATE api_tokens SET last_used = ? WHERE id = ?", (now, token_id))

    @guarded
    def list(self) -> list[TokenRecord]:
        rows = self._db.execute(
            "SELECT name, role, created_at, last_used FROM api_tokens ORDER BY name"
        ).fetchall()
        return [
            TokenRecord(str(n), Role.parse(str(r)), float(c), None if u is None else float(u))
            for n, r, c, u in rows
        ]

    @guarded
    def revoke(self, name: str) -> None:
        cur = self._db.execute("DELETE FROM api_tokens WHERE name = ?", (name,))
        if cur.rowcount == 0:
            raise NotFound(f"no API token named {name[:80]!r}")


class AuditStore:
    """The audit trail: appended by the API and the in-band state commands."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def record(self, actor: str, action: str, target: str, result: str, detail: str = "") -> None:
        """Log and keep one event.  A failing catalog is logged, never raised:
        the operation it describes has already happened."""
        actor, action, target = actor[:_TEXT_MAX], action[:_TEXT_MAX], target[:_TEXT_MAX]
        detail = detail[:_TEXT_MAX]
        audit_log.info(
            "actor=%s action=%s target=%s result=%s%s",
            actor,
            action,
            target,
            result,
            f" detail={detail}" if detail else "",
        )
        try:
            self._insert(time.time(), actor, action, target, result, detail)
        except Exception as exc:
            audit_log.error("audit record not kept in the catalog: %s", exc)

    @guarded
    def _insert(
        self, at: float, actor: str, action: str, target: str, result: str, detail: str
    ) -> None:
        with transaction(self._db):
            cur = self._db.execute(
                "INSERT INTO audit (at, actor, action, target, result, detail) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (at, actor, action, target, result, detail),
            )
            seq = cur.lastrowid or 0
            self._db.execute(
                "DELETE FROM audit WHERE seq <= ? OR at < ?",
                (seq - AUDIT_MAX_ROWS, at - AUDIT_MAX_AGE),
            )

    @guarded
    def since(self, since: float = 0.0, limit: int = 1000) -> list[AuditRecord]:
        """Events at or after ``since`` (epoch seconds), oldest first, at most ``limit``
        (the newest ones)."""
        rows = self._db.execute(
            "SELECT seq, at, actor, action, target, result, detail FROM audit "
            "WHERE at >= ? ORDER BY seq DESC LIMIT ?",
            (since, limit),
        ).fetchall()
        return [
            AuditRecord(int(s), float(a), str(ac), str(ak), str(t), str(r), str(d))
            for s, a, ac, ak, t, r, d in reversed(rows)
        ]
