"""API routes for mirrors: create, list, split, resync, restore, delete."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI, Response

from lunseal.engine.access import Role
from lunseal.engine.array import Array
from lunseal.engine.lun import Lun, run_on_lun
from lunseal.engine.mirror.mirror import SOURCE, TARGET, Mirror
from lunseal.errors import Conflict, LunsealError, NotFound
from lunseal.frontends.api.auth import allow
from lunseal.schema.mirrors import (
    MirrorCreate,
    MirrorExtent,
    MirrorInfo,
    MirrorRegions,
    MirrorRestore,
    MirrorSplit,
)


def mirror_info(m: Mirror) -> MirrorInfo:
    rec = m.record
    return MirrorInfo.model_validate(
        {
            "id": rec.id,
            "name": rec.name,
            "source": m.source.name,
            "target": m.target.name,
            "state": rec.state,
            "percent_done": round(m.progress(), 2),
            "bytes_left": m.dirty_bytes(),  # O(1): counted, never rescanned
            "bytes_copied": m.copied,
            "source_dirty_regions": m.maps[SOURCE].changed_regions(),
            "target_dirty_regions": m.maps[TARGET].changed_regions(),
            "granularity": m.work.granularity,
            "split_at": rec.split_at,
            "target_access": rec.target_access,
            "reason": rec.reason,
        }
    )


def refuse_if_connected(lun: Lun, what: str) -> None:
    if lun.users:
        raise Conflict(
            f"{what} would rewrite LUN {lun.name} while {len(lun.users)} host connection(s) "
            f"use it ({', '.join(lun.peers())}): disconnect them or use force"
        )


def then_info(m: Mirror, op: Callable[[], None]) -> Callable[[], MirrorInfo]:
    """``op``, then the mirror's report, as one job for the source's worker (so
    no copy step runs in between)."""

    def run() -> MirrorInfo:
        op()
        return mirror_info(m)

    return run


def install_mirror_routes(app: FastAPI, array: Array) -> None:
    mirrors = array.mirrors

    @app.post(
        "/v1/mirrors",
        dependencies=[allow(Role.OPERATOR)],
        response_model=MirrorInfo,
        status_code=201,
        tags=["mirrors"],
    )
    async def create_mirror(body: MirrorCreate) -> MirrorInfo:
        """Pair SOURCE with TARGET; the initial full copy runs in the background."""
        source = array.lun(body.source)
        target = array.find(body.target)
        for lun in (source, target):
            if lun is not None:
                lun.require_available()
        created = False
        if target is None:
            if not body.create_target:
                raise NotFound(f"no LUN named {body.target!r} (use create_target to create it)")
            target = array.create_lun(body.target, source.size)
            created = True
        try:
            # On the source's worker: the fan-out layer goes in between two host writes.
            # The report is made on the worker too, before any copy step runs there.
            return await run_on_lun(
                source,
                lambda: mirror_info(
                    mirrors.create(source, target, body.name, require_empty=not body.force)
                ),
            )
        except LunsealError:
            if created:  # a refused mirror leaves no LUN behind that the caller did not ask for
                array.delete_lun(target.name, force=True)
            raise

    @app.get(
        "/v1/mirrors",
        dependencies=[allow(Role.MONITOR)],
        response_model=list[MirrorInfo],
        tags=["mirrors"],
    )
    async def list_mirrors() -> list[MirrorInfo]:
        return [mirror_info(m) for m in mirrors.all()]

    @app.get(
        "/v1/mirrors/{name}",
        dependencies=[allow(Role.MONITOR)],
        response_model=MirrorInfo,
        tags=["mirrors"],
    )
    async def show_mirror(name: str) -> MirrorInfo:
        return mirror_info(mirrors.get(name))

    @app.post(
        "/v1/mirrors/{name}/split",
        dependencies=[allow(Role.OPERATOR)],
        response_model=MirrorInfo,
        tags=["mirrors"],
    )
    async def split(name: str, body: MirrorSplit | None = None) -> MirrorInfo:
        """Stop mirroring; from now on the regions written on either side are recorded."""
        m = mirrors.get(name)
        access = (body or MirrorSplit()).target_access
        return await run_on_lun(m.source, then_info(m, lambda: m.split(access)))

    @app.post(
        "/v1/mirrors/{name}/resync",
        dependencies=[allow(Role.OPERATOR)],
        response_model=MirrorInfo,
        tags=["mirrors"],
    )
    async def resync(name: str) -> MirrorInfo:
        """Copy the regions written on either side since the split, source -> target."""
        m = mirrors.get(name)
        return await run_on_lun(m.source, then_info(m, m.resync))

    @app.post(
        "/v1/mirrors/{name}/restore",
        dependencies=[allow(Role.OPERATOR)],
        response_model=MirrorInfo,
        tags=["mirrors"],
    )
    async def restore(name: str, body: MirrorRestore | None = None) -> MirrorInfo:
        """Copy the regions written on either side since the split, target -> source."""
        m = mirrors.get(name)
        if not (body or MirrorRestore()).force:
            refuse_if_connected(m.source, f"restoring mirror {m.name}")
        return await run_on_lun(m.source, then_info(m, m.restore))

    @app.get(
        "/v1/mirrors/{name}/regions",
        dependencies=[allow(Role.MONITOR)],
        response_model=MirrorRegions,
        tags=["mirrors"],
    )
    async def regions(name: str) -> MirrorRegions:
        """The regions the next resync or restore would copy (written on either side)."""
        m = mirrors.get(name)
        # A walk over the map (O(LUN size / 64 KiB)): on the source's worker, which
        # also keeps it consistent with the writes that mark the map.
        extents = await run_on_lun(m.source, m.copy_extents)
        return MirrorRegions(
            granularity=m.work.granularity,
            extents=[MirrorExtent(offset=e.offset, length=e.length) for e in extents],
        )

    @app.delete(
        "/v1/mirrors/{name}", dependencies=[allow(Role.ADMIN)], status_code=204, tags=["mirrors"]
    )
    async def delete_mirror(name: str) -> Response:
        """Delete the mirror; both LUNs stay."""
        source = mirrors.get(name).source
        await run_on_lun(source, lambda: mirrors.delete(name))
        return Response(status_code=204)
