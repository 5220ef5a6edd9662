"""A small typed client for the management API, used by the CLI and host tools.

It finds a local daemon through its data directory (``daemon.json`` and the
``api-token`` file) or talks to an explicit URL with an explicit token, as a
tool on another host would.
"""

from __future__ import annotations

import json
import os
import urllib.parse
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel, ValidationError

from lunseal.errors import ERRORS_BY_CODE, DaemonUnavailable, InvalidArgument, LunsealError
from lunseal.home import Home
from lunseal.schema.access import AuditEntry, TokenCreate, TokenCreated, TokenInfo
from lunseal.schema.iscsi import ChapBody, ChapSet, InitiatorAllow, InitiatorInfo, IscsiInfo
from lunseal.schema.luns import ArrayStatus, LunCreate, LunGrow, LunInfo, LunRepoint, LunUpdate
from lunseal.schema.mirrors import (
    MirrorCreate,
    MirrorInfo,
    MirrorRegions,
    MirrorRestore,
    MirrorSplit,
)
from lunseal.schema.nbd_access import NbdAccessEntry, NbdAccessInfo
from lunseal.schema.state import (
    ChangesInfo,
    CheckOutcome,
    HoldAcquire,
    HoldInfo,
    StateInfo,
    TokenCheck,
)
from lunseal.tlsconfig import build_client_context

M = TypeVar("M", bound=BaseModel)


#: CA bundle the API's HTTPS certificate is verified against (else the system's CAs).
CA_FILE_ENV = "LUNSEAL_CA_FILE"


class ArrayClient:
    def __init__(
        self, url: str, token: str, *, timeout: float = 30.0, ca_file: Path | None = None
    ) -> None:
        self.url = url.rstrip("/")
        if ca_file is None and os.environ.get(CA_FILE_ENV):
            ca_file = Path(os.environ[CA_FILE_ENV])
        # Always verified: a bearer token must never go to an unproven server.
        verify = build_client_context(ca_file) if self.url.startswith("https:") else True
        self._http = httpx.Client(
            base_url=self.url,
            headers={"Authorization": f"Bearer {token}"},
            timeout=timeout,
            verify=verify,
        )

    @classmethod
    def for_home(
        cls, root: Path, token: str | None = None, *, ca_file: Path | None = None
    ) -> ArrayClient:
        """Connect to the daemon that serves the data directory ``root``, with
        ``token``, else the data directory's first-start admin token."""
        home = Home(root)
        try:
            info = json.loads(home.daemon_info.read_text())
            if token is None:
                token = home.api_token.read_text().strip()
        except FileNotFoundError:
            raise DaemonUnavailable(
                f"no lunseal daemon is running for {root} (start one with: "
                f"lunseal --home {root} serve)"
            ) from None
        published = info.get("api_ca_file")
        if ca_file is None and published and not os.environ.get(CA_FILE_ENV):
            ca_file = Path(published)
        return cls(str(info["api_url"]), token, ca_file=ca_file)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> ArrayClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transport --------------------------------------------------------------

    def _call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise DaemonUnavailable(f"cannot reach the lunseal API at {self.url}: {exc}") from exc
        if response.is_error:
            raise _error_from(response)
        return response

    def _get(self, model: type[M], path: str) -> M:
        return model.model_validate(self._call("GET", path).json())

    # -- array ------------------------------------------------------------------

    def status(self) -> ArrayStatus:
        return self._get(ArrayStatus, "/v1/status")

    # -- LUNs -------------------------------------------------------------------

    def list_luns(self) -> list[LunInfo]:
        return [LunInfo.model_validate(item) for item in self._call("GET", "/v1/luns").json()]

    def show_lun(self, name: str) -> LunInfo:
        return self._get(LunInfo, f"/v1/luns/{_quote(name)}")

    def create_lun(
        self,
        name: str,
        size: str | int | None,
        *,
        number: int | None = None,
        read_only: bool = False,
        path: str | None = None,
    ) -> LunInfo:
        body = LunCreate(name=name, size=size, number=number, read_only=read_only, path=path)
        response = self._call("POST", "/v1/luns", json=body.model_dump(exclude_none=True))
        return LunInfo.model_validate(response.json())

    def grow_lun(self, name: str, size: str | int) -> LunInfo:
        body = LunGrow(size=size).model_dump()
        response = self._call("POST", f"/v1/luns/{_quote(name)}/grow", json=body)
        return LunInfo.model_validate(response.json())

    def repoint_lun(self, name: str, path: str) -> LunInfo:
        body = LunRepoint(path=path).model_dump()
        response = self._call("POST", f"/v1/luns/{_quote(name)}/repoint", json=body)
        return LunInfo.model_validate(response.json())

    def update_lun(self, name: str, *, read_only: bool | None = None) -> LunInfo:
        body = LunUpdate(read_only=read_only).model_dump(exclude_none=True)
        response = self._call("PATCH", f"/v1/luns/{_quote(name)}", json=body)
        return LunInfo.model_validate(response.json())

    # -- state tracking -----------------------------------------------------------

    def acquire_hold(
        self,
        lun: str,
        hold: str = "default",
        *,
        mode: str | None = None,
        granularity: str | int | None = None,
        track_changes: bool = False,
    ) -> HoldInfo:
        try:
            body = HoldAcquire.model_validate(
                {
                    "hold": hold,
                    "mode": mode,
                    "granularity": granularity,
                    "track_changes": track_changes,
                }
            )
        except ValidationError as exc:
            raise InvalidArgument(f"invalid hold request: {exc.errors()[0]['msg']}") from None
        response = self._call(
            "POST", f"/v1/luns/{_quote(lun)}/holds", json=body.model_dump(exclude_none=True)
        )
        return HoldInfo.model_validate(response.json())

    def release_hold(self, lun: str, hold: str = "default") -> None:
        self._call("DELETE", f"/v1/luns/{_quote(lun)}/holds/{_quote(hold)}")

    def list_holds(self, lun: str) -> list[HoldInfo]:
        items = self._call("GET", f"/v1/luns/{_quote(lun)}/holds").json()
        return [HoldInfo.model_validate(item) for item in items]

    def state(self, lun: str) -> StateInfo:
        return self._get(StateInfo, f"/v1/luns/{_quote(lun)}/state")

    def token(self, lun: str) -> StateInfo:
        """The current token (GET_LUN_STATE); Conflict while tracking is off."""
        return self._get(StateInfo, f"/v1/luns/{_quote(lun)}/state/token")

    def check_token(self, lun: str, token: str) -> CheckOutcome:
        body = TokenCheck(token=token).model_dump()
        response = self._call("POST", f"/v1/luns/{_quote(lun)}/state/check", json=body)
        return CheckOutcome.model_validate(response.json())

    def changes(self, lun: str, hold: str = "default") -> ChangesInfo:
        return self._get(ChangesInfo, f"/v1/luns/{_quote(lun)}/holds/{_quote(hold)}/changes")

    # -- mirrors ----------------------------------------------------------------------

    def create_mirror(
        self,
        source: str,
        target: str,
        *,
        name: str | None = None,
        create_target: bool = False,
        force: bool = False,
    ) -> MirrorInfo:
        body = MirrorCreate(
            source=source, target=target, name=name, create_target=create_target, force=force
        )
        response = self._call("POST", "/v1/mirrors", json=body.model_dump(exclude_none=True))
        return MirrorInfo.model_validate(response.json())

    def list_mirrors(self) -> list[MirrorInfo]:
        return [MirrorInfo.model_validate(m) for m in self._call("GET", "/v1/mirrors").json()]

    def mirror(self, name: str) -> MirrorInfo:
        return self._get(MirrorInfo, f"/v1/mirrors/{_quote(name)}")

    def split_mirror(self, name: str, *, target_access: str = "ro") -> MirrorInfo:
        body = MirrorSplit.model_validate({"target_access": target_access}).model_dump()
        response = self._call("POST", f"/v1/mirrors/{_quote(name)}/split", json=body)
        return MirrorInfo.model_validate(response.json())

    def resync_mirror(self, name: str) -> MirrorInfo:
        response = self._call("POST", f"/v1/mirrors/{_quote(name)}/resync")
        return MirrorInfo.model_validate(response.json())

    def restore_mirror(self, name: str, *, force: bool = False) -> MirrorInfo:
        body = MirrorRestore(force=force).model_dump()
        response = self._call("POST", f"/v1/mirrors/{_quote(name)}/restore", json=body)
        return MirrorInfo.model_validate(response.json())

    def mirror_regions(self, name: str) -> MirrorRegions:
        """The regions the mirror's next resync or restore would copy."""
        return self._get(MirrorRegions, f"/v1/mirrors/{_quote(name)}/regions")

    def delete_mirror(self, name: str) -> None:
        self._call("DELETE", f"/v1/mirrors/{_quote(name)}")

    def delete_lun(self, name: str, *, force: bool = False) -> None:
        params = {"force": "true"} if force else {}
        self._call("DELETE", f"/v1/luns/{_quote(name)}", params=params)

    # -- iSCSI initiator ACL ------------------------------------------------------------

    def iscsi(self) -> IscsiInfo:
        return self._get(IscsiInfo, "/v1/iscsi")

    def allow_initiator(self, name: str, body: InitiatorAllow) -> InitiatorInfo:
        path = f"/v1/iscsi/initiators/{_quote(name)}"
        response = self._call("POST", path, json=body.model_dump(exclude_none=True))
        return InitiatorInfo.model_validate(response.json())

    def deny_initiator(self, name: str) -> None:
        self._call("DELETE", f"/v1/iscsi/initiators/{_quote(name)}")

    def set_initiator_lun(self, name: str, lun: str, access: str) -> InitiatorInfo:
        """``access``: ro, rw, or none (the initiator no longer sees the LUN)."""
        path = f"/v1/iscsi/initiators/{_quote(name)}/luns/{_quote(lun)}"
        if access == "none":
            response = self._call("DELETE", path)
        else:
            response = self._call("PUT", path, json={"access": access})
        return InitiatorInfo.model_validate(response.json())

    def set_chap(self, name: str, chap: ChapBody | None, mutual: ChapBody | None) -> InitiatorInfo:
        """Set (or with ``chap`` None, clear) the initiator's CHAP credentials."""
        path = f"/v1/iscsi/initiators/{_quote(name)}/chap"
        if chap is None:
            response = self._call("DELETE", path)
        else:
            body = ChapSet(chap=chap, mutual=mutual).model_dump(exclude_none=True)
            response = self._call("PUT", path, json=body)
        return InitiatorInfo.model_validate(response.json())

    # -- API tokens and the audit trail ---------------------------------------------------

    def create_token(self, name: str, role: str) -> TokenCreated:
        body = TokenCreate.model_validate({"name": name, "role": role}).model_dump()
        return TokenCreated.model_validate(self._call("POST", "/v1/tokens", json=body).json())

    def list_tokens(self) -> list[TokenInfo]:
        return [TokenInfo.model_validate(t) for t in self._call("GET", "/v1/tokens").json()]

    def revoke_token(self, name: str) -> None:
        self._call("DELETE", f"/v1/tokens/{_quote(name)}")

    def audit(self, since: float = 0.0, limit: int = 1000) -> list[AuditEntry]:
        params = {"since": repr(since), "limit": str(limit)}
        response = self._call("GET", "/v1/audit", params=params)
        return [AuditEntry.model_validate(e) for e in response.json()]

    # -- NBD export ACL ------------------------------------------------------------------

    def nbd_access(self, lun: str) -> NbdAccessInfo:
        return self._get(NbdAccessInfo, f"/v1/luns/{_quote(lun)}/nbd-access")

    def allow_nbd(self, lun: str, client: str, access: str) -> NbdAccessInfo:
        body = NbdAccessEntry.model_validate({"client": client, "access": access})
        response = self._call("POST", f"/v1/luns/{_quote(lun)}/nbd-access", json=body.model_dump())
        return NbdAccessInfo.model_validate(response.json())

    def deny_nbd(self, lun: str, client: str | None) -> NbdAccessInfo:
        """Remove one entry, or with ``client`` None every entry."""
        params = {} if client is None else {"client": client}
        response = self._call("DELETE", f"/v1/luns/{_quote(lun)}/nbd-access", params=params)
        return NbdAccessInfo.model_validate(response.json())


def _quote(name: str) -> str:
    # Escape everything: a name like "x?force=true" must not become a query string.
    return urllib.parse.quote(name, safe="")


def _error_from(response: httpx.Response) -> LunsealError:
    try:
        body = response.json()
        cls = ERRORS_BY_CODE.get(str(body.get("error")), LunsealError)
        return cls(str(body.get("message")))
    except (ValueError, AttributeError):
        return LunsealError(f"API error {response.status_code}: {response.text[:200]}")
