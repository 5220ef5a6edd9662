"""API routes for the NBD export ACL (``/v1/luns/{lun}/nbd-access``).

Changes go to the catalog first (see :mod:`lunseal.engine.nbd_access`); the
NBD server then ends every connection whose access changed, before the call
returns when the API runs on the server's loop (as in the daemon).
"""

from __future__ import annotations

from fastapi import FastAPI, Response

from lunseal.engine.access import Role
from lunseal.engine.array import Array
from lunseal.frontends.api.auth import allow
from lunseal.schema.nbd_access import NbdAccessEntry, NbdAccessInfo


def access_info(array: Array, name: str) -> NbdAccessInfo:
    lun = array.lun(name)
    entries = array.catalog.nbd_access.entries(lun.record.uuid)
    listed = [
        NbdAccessEntry(client=str(spec), access="ro" if ro else "rw")
        for spec, ro in sorted(entries.items(), key=lambda e: str(e[0]))
    ]
    return NbdAccessInfo(lun=lun.name, open=not listed, entries=listed)


def install_nbd_access_routes(app: FastAPI, array: Array) -> None:
    store = array.catalog.nbd_access

    @app.get(
        "/v1/luns/{lun}/nbd-access",
        dependencies=[allow(Role.MONITOR)],
        response_model=NbdAccessInfo,
        tags=["nbd"],
    )
    async def show(lun: str) -> NbdAccessInfo:
        """Who may open the LUN over NBD (no entry: anyone)."""
        return access_info(array, lun)

    @app.post(
        "/v1/luns/{lun}/nbd-access",
        dependencies=[allow(Role.ADMIN)],
        response_model=NbdAccessInfo,
        tags=["nbd"],
    )
    async def grant(lun: str, body: NbdAccessEntry, response: Response) -> NbdAccessInfo:
        """Add an entry or change its access; the first entry closes the LUN to every
        client not listed.  201 when something changed."""
        if store.allow(array.lun(lun).record.uuid, body.client, body.access):
            response.status_code = 201
        return access_info(array, lun)

    @app.delete(
        "/v1/luns/{lun}/nbd-access",
        dependencies=[allow(Role.ADMIN)],
        response_model=NbdAccessInfo,
        tags=["nbd"],
    )
    async def deny(lun: str, client: str | None = None) -> NbdAccessInfo:
        """Remove one entry (``?client=``), or without it every entry: with none
        left, any client may open the LUN again."""
        uuid = array.lun(lun).record.uuid
        if client is None:
            store.clear(uuid)
        else:
            store.remove(uuid, client)
        return access_info(array, lun)
