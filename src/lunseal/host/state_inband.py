"""State tokens over iSCSI only: the in-band STATE IN/OUT commands, from a host
that has no API access (``lunseal state ... iscsi://HOST[:PORT]/IQN/LUN``).

The answers are turned back into the errors the API would raise (a missing
hold is NotFound, a conflict Conflict, a bad token InvalidArgument), so the
CLI exits with the same codes either way.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from pydantic import BaseModel, Field

from lunseal.engine.state.tracker import TrackingMode
from lunseal.errors import (
    CatalogError,
    Conflict,
    InvalidArgument,
    LunsealError,
    LunUnavailable,
    NotFound,
)
from lunseal.frontends.iscsi.access import ChapSecret
from lunseal.frontends.scsi import state_commands as sc
from lunseal.host.iscsi.initiator import Initiator, IscsiUrl, Response, parse_url
from lunseal.host.secret_file import CHAP_SECRET_ENV, MUTUAL_SECRET_ENV, read_secret

INITIATOR_ENV = "LUNSEAL_INITIATOR_NAME"
CHAP_USER_ENV = "LUNSEAL_CHAP_USER"
MUTUAL_USER_ENV = "LUNSEAL_MUTUAL_USER"
#: READ TOKEN and REPORT CHECK RESULT answers are small; this leaves room for
#: many holds, and a truncated answer is asked for again at its full length.
ALLOCATION = 16 << 10
ALLOCATION_MAX = 1 << 20
GOOD = 0x00
CHECK_CONDITION = 0x02
UNIT_ATTENTION = 0x06
#: A new session first hears "power on or reset", maybe "capacity changed", ...:
#: a command answered with a unit attention was not run, so it is sent again.
ATTENTION_RETRIES = 8


def is_iscsi_url(lun: str) -> bool:
    return lun.startswith("iscsi://")


def default_initiator_name() -> str:
    host = "".join(c if c.isalnum() or c in ".-" else "-" for c in socket.gethostname().lower())
    return f"iqn.2026-12.io.lunseal:host.{host or 'unknown'}"


@dataclass(frozen=True)
class Credentials:
    initiator: str
    chap: ChapSecret | None = None
    mutual: ChapSecret | None = None


class InbandState(BaseModel):
    """What ``state get|disable`` print over iSCSI (the API's StateInfo, as far as
    the LUN itself tells)."""

    url: str
    lun: int
    tracking: bool
    clean: bool
    mode: TrackingMode
    token: str | None
    holds: list[str]


class InbandHold(BaseModel):
    url: str
    name: str
    token: str = Field(description="the LUN's token when the hold was acquired")
    granularity: int | None


class InbandCheck(BaseModel):
    url: str
    result: str
    reason: str
    token: str
    current: str | None


class InbandClient:
    """One iSCSI session to one LUN, for the state commands."""

    def __init__(self, url: str, creds: Credentials, *, timeout: float = 30.0) -> None:
        self.url = url
        self.target: IscsiUrl = parse_url(url)
        chap = creds.chap
        if chap is None and self.target.user:
            chap = ChapSecret(self.target.user, self.target.secret)  # libiscsi's user%secret@
        self._ini = Initiator.connect(
            self.target.host, self.target.port, timeout=timeout, name=creds.initiator
        )
        try:
            self._ini.login(self.target.target, chap=chap, mutual=creds.mutual)
        except BaseException:
            self._ini.close()
            raise

    def close(self) -> None:
        try:
            self._ini.logout()
        except (LunsealError, OSError):
            pass  # the session ends with the connection anyway
        finally:
            self._ini.close()

    def __enter__(self) -> InbandClient:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    # -- the seed's commands ---------------------------------------------------------

    def read(self) -> sc.TokenReport:
        return sc.decode_token_report(self._read(sc.InAction.READ_TOKEN))

    def state(self) -> InbandState:
        r = self.read()
        return InbandState(
            url=self.url,
            lun=self.target.lun,
            tracking=r.tracking,
            clean=r.clean,
            mode=r.mode,
            token=r.token,
            holds=[h.name for h in r.holds],
        )

    def token(self) -> InbandState:
        """GET_LUN_STATE; Conflict while tracking is off, as the API answers."""
        st = self.state()
        if not st.tracking:
            raise Conflict(
                f"state tracking is off for LUN {self.target.lun} at {self.url}: acquire "
                "a hold first (lunseal state enable)"
            )
        return st

    def acquire(
        self, hold: str, mode: TrackingMode | None = None, granularity: int | None = None
    ) -> InbandHold:
        """ENABLE_LUN_STATE_SNAPSHOT: returns the hold with the token it was given."""
        params = sc.acquire_parameters(sc.HoldRequest(hold, mode, granularity))
        self._out(sc.OutAction.ACQUIRE_HOLD, params)
        for h in self.read().holds:
            if h.name == hold:
                return InbandHold(
                    url=self.url, name=h.name, token=h.token, granularity=h.granularity
                )
        raise NotFound(f"hold {hold!r} was released again before its token could be read")

    def release(self, hold: str) -> None:
        self._out(sc.OutAction.RELEASE_HOLD, sc.string_parameters(hold))

    def check(self, token: str, list_id: int = 0) -> InbandCheck:
        self._out(sc.OutAction.CHECK_TOKEN, sc.string_parameters(token), list_id)
        answer = sc.decode_check_report(self._read(sc.InAction.REPORT_CHECK_RESULT, list_id))
        return InbandCheck(
            url=self.url,
            result="intact" if answer.intact else "changed",
            reason=answer.reason,
            token=token,
            current=answer.current,
        )

    # -- commands --------------------------------------------------------------------

    def _command(self, cdb: bytes, *, data_out: bytes = b"", read_length: int = 0) -> Response:
        for _ in range(ATTENTION_RETRIES):
            r = self._ini.command(self.target.lun, cdb, data_out=data_out, read_length=read_length)
            if not (r.status == CHECK_CONDITION and r.sense_key == UNIT_ATTENTION):
                break
        _raise_for(r.status, r.sense, f"LUN {self.target.lun} at {self.url}")
        return r

    def _out(self, action: sc.OutAction, params: bytes, list_id: int = 0) -> None:
        self._command(sc.state_out_cdb(action, len(params), list_id), data_out=params)

    def _read(self, action: sc.InAction, list_id: int = 0) -> bytes:
        allocation = ALLOCATION
        while True:
            cdb = sc.state_in_cdb(action, allocation, list_id)
            data = bytes(self._command(cdb, read_length=allocation).data)
            full = 4 + struct.unpack_from(">I", data)[0] if len(data) >= 4 else 0
            if full <= len(data) or allocation >= ALLOCATION_MAX:
                return data
            allocation = min(full, ALLOCATION_MAX)


def _raise_for(status: int, sense: bytes, where: str) -> None:
    """The API's error for a CHECK CONDITION (see docs/iscsi-state-commands.md)."""
    if status == GOOD:
        return
    if len(sense) < 14:
        raise LunsealError(f"the target answered SCSI status {status:#04x} without sense data")
    key, asc, ascq = sense[2] & 0x0F, sense[12], sense[13]
    message = sense[sc.SENSE_FIXED :].decode(errors="replace") or (
        f"the target refused the command: sense key {key:#x}, ASC/ASCQ {asc:#04x}/{ascq:#04x}"
    )
    if asc == sc.ASC_STATE:
        cls: type[LunsealError] = {
            sc.ASCQ_CONFLICT: Conflict,
            sc.ASCQ_NOT_FOUND: NotFound,
            sc.ASCQ_CATALOG: CatalogError,
        }.get(ascq, LunsealError)
        raise cls(message)
    if key == sc.ILLEGAL_REQUEST and asc in (0x24, 0x26, 0x1A):
        raise InvalidArgument(message)
    if key == sc.ILLEGAL_REQUEST and asc == 0x25:
        raise NotFound(f"no {where}, or this initiator does not see it")
    if key == sc.ILLEGAL_REQUEST and asc == 0x20:
        raise NotFound(f"{where} does not know the state commands: not a lunseal target")
    if key == sc.NOT_READY:
        raise LunUnavailable(message)
    raise LunsealError(message)


def credentials(
    initiator: str | None,
    chap_user: str | None,
    chap_secret_file: Path | None,
    mutual_user: str | None,
    mutual_secret_file: Path | None,
) -> Credentials:
    """From options and the environment; secrets never from the command line."""
    name = initiator or os.environ.get(INITIATOR_ENV) or default_initiator_name()
    chap = _chap(chap_user or os.environ.get(CHAP_USER_ENV), chap_secret_file, CHAP_SECRET_ENV)
    mutual = _chap(
        mutual_user or os.environ.get(MUTUAL_USER_ENV), mutual_secret_file, MUTUAL_SECRET_ENV
    )
    if mutual is not None and chap is None:
        raise InvalidArgument("mutual CHAP needs the initiator's own CHAP user and secret too")
    return Credentials(name, chap, mutual)


def _chap(user: str | None, secret_file: Path | None, env: str) -> ChapSecret | None:
    secret = read_secret(secret_file, env, "CHAP secret")
    if user is None:
        if secret_file is not None:
            raise InvalidArgument("a CHAP secret file needs its user name too")
        return None
    if secret is None:
        raise InvalidArgument(f"CHAP user {user!r} needs a secret: a secret file or ${env}")
    return ChapSecret(user, secret)
