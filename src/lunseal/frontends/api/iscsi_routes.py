"""API routes for the iSCSI target's initiator ACL (``/v1/iscsi``).

Changes go to the catalog first (see :mod:`lunseal.engine.iscsi_acl`); they
apply from the initiator's next login.  CHAP secrets are accepted here and
never returned.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response

from lunseal.engine.access import Role
from lunseal.engine.array import Array
from lunseal.engine.iscsi_acl import Chap, InitiatorRecord
from lunseal.frontends.api import auth
from lunseal.schema.iscsi import (
    ChapBody,
    ChapSet,
    InitiatorAllow,
    InitiatorInfo,
    IscsiInfo,
    LunAccessInfo,
    LunAccessSet,
)

#: The target's name and portal, or ``None`` while iSCSI is off.
TargetInfo = Callable[[], tuple[str | None, str | None]]


def initiator_info(array: Array, rec: InitiatorRecord) -> InitiatorInfo:
    by_uuid = {lun.record.uuid: lun for lun in array.luns()}
    luns = [
        LunAccessInfo(lun=lun.name, number=lun.record.number, access="ro" if ro else "rw")
        for uuid, ro in rec.luns.items()
        if (lun := by_uuid.get(uuid)) is not None
    ]
    return InitiatorInfo(
        name=rec.name,
        created_at=rec.created_at,
        all_luns=rec.all_luns,
        luns=sorted(luns, key=lambda a: a.number),
        chap_user=None if rec.chap is None else rec.chap.user,
        mutual_user=None if rec.mutual is None else rec.mutual.user,
    )


def _chap(body: ChapBody | None) -> Chap | None:
    return None if body is None else Chap(body.user, body.secret)


def _allowed(
    array: Array, name: str, old: InitiatorRecord | None, body: InitiatorAllow
) -> InitiatorRecord:
    rec = old or InitiatorRecord(name=name, created_at=0.0)
    luns = rec.luns
    if body.luns is not None:
        luns = {array.lun(lun).record.uuid: access == "ro" for lun, access in body.luns.items()}
    all_luns = rec.all_luns if body.luns is None else False
    if body.all_luns is not None:
        all_luns = body.all_luns
    if all_luns:
        luns = {uuid: ro for uuid, ro in luns.items() if ro}  # only read-only ones matter
    chap = _chap(body.chap) or rec.chap
    mutual = _chap(body.mutual) or rec.mutual
    return InitiatorRecord(rec.name, rec.created_at, all_luns, luns, chap, mutual)


def install_iscsi_routes(app: FastAPI, array: Array, target: TargetInfo) -> None:
    store = array.catalog.iscsi_acl

    @app.get(
        "/v1/iscsi",
        dependencies=[auth.allow(Role.MONITOR)],
        response_model=IscsiInfo,
        tags=["iscsi"],
    )
    async def show() -> IscsiInfo:
        """The target's name and portal and the initiator ACL (never a secret)."""
        name, portal = target()
        return IscsiInfo(
            target=name,
            portal=portal,
            open=not store.configured,
            initiators=[initiator_info(array, rec) for rec in store.initiators()],
        )

    @app.get(
        "/v1/iscsi/initiators/{name}",
        dependencies=[auth.allow(Role.MONITOR)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def show_initiator(name: str) -> InitiatorInfo:
        return initiator_info(array, store.require(name))

    @app.post(
        "/v1/iscsi/initiators/{name}",
        dependencies=[auth.allow(Role.ADMIN)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def allow(name: str, body: InitiatorAllow, response: Response) -> InitiatorInfo:
        """Allow an initiator to log in (the first one closes the target to all others),
        or change the parts given of one already allowed.  201 when it is new."""
        rec = _allowed(array, name, store.get(name), body)
        if store.put(rec):
            response.status_code = 201
        return initiator_info(array, store.require(name))

    @app.delete(
        "/v1/iscsi/initiators/{name}",
        dependencies=[auth.allow(Role.ADMIN)],
        status_code=204,
        tags=["iscsi"],
    )
    async def deny(name: str) -> Response:
        """Forget an initiator; with none left, anyone may log in again."""
        store.delete(name)
        return Response(status_code=204)

    @app.put(
        "/v1/iscsi/initiators/{name}/luns/{lun}",
        dependencies=[auth.allow(Role.ADMIN)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def set_lun(name: str, lun: str, body: LunAccessSet) -> InitiatorInfo:
        rec = store.set_lun(name, array.lun(lun).record.uuid, body.access)
        return initiator_info(array, rec)

    @app.delete(
        "/v1/iscsi/initiators/{name}/luns/{lun}",
        dependencies=[auth.allow(Role.ADMIN)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def hide_lun(name: str, lun: str) -> InitiatorInfo:
        """The initiator no longer sees the LUN (refused while it sees every LUN)."""
        rec = store.set_lun(name, array.lun(lun).record.uuid, "none")
        return initiator_info(array, rec)

    @app.put(
        "/v1/iscsi/initiators/{name}/chap",
        dependencies=[auth.allow(Role.ADMIN)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def set_chap(name: str, body: ChapSet) -> InitiatorInfo:
        rec = store.set_chap(name, _chap(body.chap), _chap(body.mutual))
        return initiator_info(array, rec)

    @app.delete(
        "/v1/iscsi/initiators/{name}/chap",
        dependencies=[auth.allow(Role.ADMIN)],
        response_model=InitiatorInfo,
        tags=["iscsi"],
    )
    async def clear_chap(name: str) -> InitiatorInfo:
        return initiator_info(array, store.set_chap(name, None, None))
