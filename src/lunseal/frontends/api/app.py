"""The management API: HTTP+JSON, served by the daemon on its own event loop.

Handlers are ``async`` on purpose: they then run on the loop thread, the same
thread that serves NBD, so the engine is never entered concurrently.

Every path, including the OpenAPI description, requires a bearer token
(``auth.py``); each route declares the role it needs, and every call that may
change state is written to the audit trail.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lunseal import __version__
from lunseal.engine.access import Role
from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.engine.sqlite_guard import catalog_error
from lunseal.errors import InvalidArgument, LunsealError, NotFound, Unauthorized
from lunseal.frontends.api.access_routes import install_access_routes
from lunseal.frontends.api.auth import allow, install_auth, note_error
from lunseal.frontends.api.iscsi_routes import install_iscsi_routes
from lunseal.frontends.api.metrics import Exposure, Sources, render
from lunseal.frontends.api.mirror_routes import install_mirror_routes
from lunseal.frontends.api.nbd_access_routes import install_nbd_access_routes
from lunseal.frontends.api.state_routes import install_state_routes
from lunseal.frontends.nbd.server import NbdServer
from lunseal.schema.luns import (
    ArrayStatus,
    ErrorBody,
    LunCreate,
    LunGrow,
    LunInfo,
    LunRepoint,
    LunStatsModel,
    LunUpdate,
    NbdEndpoints,
)
from lunseal.units import parse_size

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorBody, "description": "invalid argument"},
    401: {"model": ErrorBody, "description": "missing or wrong bearer token"},
    403: {"model": ErrorBody, "description": "the token's role may not do this"},
    404: {"model": ErrorBody, "description": "no such LUN"},
    409: {"model": ErrorBody, "description": "conflict (name or number taken, LUN in use)"},
    503: {"model": ErrorBody, "description": "the catalog failed (e.g. its disk is full); retry"},
}

log = logging.getLogger(__name__)


@dataclass
class DaemonContext:
    array: Array
    nbd: NbdServer
    token: str
    api_url: str = ""
    started: float = field(default_factory=time.monotonic)
    #: The iSCSI target's name and portal (HOST:PORT); None while iSCSI is off.
    iscsi_target: str | None = None
    iscsi_portal: str | None = None
    #: Open iSCSI connections (metrics); None while iSCSI is off.
    iscsi_connections: Callable[[], int] | None = None
    #: Listeners open beyond loopback without protection (status, metrics).
    exposures: Callable[[], list[Exposure]] = list
    #: SIGHUP reloads by result (metrics).
    reloads: Callable[[], dict[str, int]] = dict


def create_app(ctx: DaemonContext) -> FastAPI:
    app = FastAPI(
        title="lunseal management API",
        version=__version__,
        description="Manage the LUNs of a lunseal array. Every request needs "
        "`Authorization: Bearer <token>`; the token is in the data directory's api-token file.",
        responses=_ERRORS,
    )
    catalog = ctx.array.catalog
    install_auth(app, ctx.token, catalog.api_tokens, catalog.audit, _error_response)
    _install_error_handlers(app)
    _install_routes(app, ctx)
    install_state_routes(app, ctx.array)
    install_mirror_routes(app, ctx.array)
    install_iscsi_routes(app, ctx.array, lambda: (ctx.iscsi_target, ctx.iscsi_portal))
    install_access_routes(app, catalog.api_tokens, catalog.audit)
    install_nbd_access_routes(app, ctx.array)
    _install_metrics(app, ctx)
    return app


def _install_metrics(app: FastAPI, ctx: DaemonContext) -> None:
    def connections() -> dict[str, int]:
        counts = {"nbd": len(ctx.nbd.connections)}
        if ctx.iscsi_connections is not None:
            counts["iscsi"] = ctx.iscsi_connections()
        return counts

    sources = Sources(ctx.array, connections, lambda: ctx.exposures(), lambda: ctx.reloads())

    @app.get(
        "/metrics",
        dependencies=[allow(Role.MONITOR)],
        tags=["array"],
        response_class=Response,
    )
    async def metrics() -> Response:
        """Prometheus metrics (text exposition format)."""
        body, content_type = render(sources)
        return Response(body, media_type=content_type)


def _error_response(exc: LunsealError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else None
    body = ErrorBody(error=exc.code, message=exc.message).model_dump()
    return JSONResponse(body, status_code=exc.http_status, headers=headers)


def _install_error_handlers(app: FastAPI) -> None:
    async def on_lunseal_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, LunsealError)
        note_error(request, exc)
        return _error_response(exc)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in exc.errors()
        )
        return _error_response(InvalidArgument(f"invalid request: {problems}"))

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        # Routing errors (no such path, wrong method) keep the {"error", "message"} shape.
        assert isinstance(exc, StarletteHTTPException)
        code = NotFound.code if exc.status_code == 404 else "http_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        body = ErrorBody(error=code, message=message).model_dump()
        return JSONResponse(body, status_code=exc.status_code, headers=exc.headers)

    async def on_sqlite_error(request: Request, exc: Exception) -> JSONResponse:
        # A catalog path that does not translate its errors still answers 503.
        assert isinstance(exc, sqlite3.Error)
        log.error("%s %s: catalog failure: %s", request.method, request.url.path, exc)
        return _error_response(catalog_error(exc))

    app.add_exception_handler(LunsealError, on_lunseal_error)
    app.add_exception_handler(sqlite3.Error, on_sqlite_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)


def lun_info(lun: Lun, nbd: NbdServer) -> LunInfo:
    rec = lun.record
    uris = []
    if nbd.tcp_address is not None:
        host, port = nbd.tcp_address
        host = f"[{host}]" if ":" in host else host
        # nbds: the client must STARTTLS (libnbd's and lunseal's clients do).
        scheme = "nbds" if nbd.tls_offered else "nbd"
        uris.append(f"{scheme}://{host}:{port}/{rec.name}")
    if nbd.unix_path is not None:
        uris.append(f"nbd+unix:///{rec.name}?socket={nbd.unix_path}")
    s = lun.stats
    return LunInfo(
        uuid=rec.uuid,
        name=rec.name,
        number=rec.number,
        size=rec.size,
        read_only=lun.read_only,
        read_only_reason=_read_only_reason(lun),
        backend=rec.backend,
        path=rec.path,
        created_at=rec.created_at,
        connections=len(lun.users),
        clients=lun.peers(),
        nbd_uris=uris,
        stats=LunStatsModel(
            reads=s.reads,
            writes=s.writes,
            bytes_read=s.bytes_read,
            bytes_written=s.bytes_written,
            trims=s.trims,
            zeroes=s.zeroes,
            flushes=s.flushes,
        ),
        available=lun.available,
        unavailable_reason=lun.unavailable or None,
    )


def _read_only_reason(lun: Lun) -> str:
    if lun.record.read_only:
        return "the LUN is set read-only"
    return next(iter(lun.write_guards.values()), "")


def _install_routes(app: FastAPI, ctx: DaemonContext) -> None:
    array, nbd = ctx.array, ctx.nbd

    @app.get(
        "/v1/status", dependencies=[allow(Role.MONITOR)], response_model=ArrayStatus, tags=["array"]
    )
    async def status() -> ArrayStatus:
        tcp = nbd.tcp_address
        return ArrayStatus(
            array_id=array.array_id,
            version=__version__,
            pid=os.getpid(),
            data_dir=str(array.data_dir),
            uptime_seconds=time.monotonic() - ctx.started,
            last_shutdown_clean=array.last_shutdown_clean,
            luns=len(array.luns()),
            connections=len(nbd.connections),
            nbd=NbdEndpoints(
                tcp=f"{tcp[0]}:{tcp[1]}" if tcp else None,
                unix=str(nbd.unix_path) if nbd.unix_path else None,
            ),
            api_url=ctx.api_url,
            warnings=[item.message() for item in ctx.exposures()],
        )

    @app.get(
        "/v1/luns", dependencies=[allow(Role.MONITOR)], response_model=list[LunInfo], tags=["luns"]
    )
    async def list_luns() -> list[LunInfo]:
        return [lun_info(lun, nbd) for lun in array.luns()]

    @app.post(
        "/v1/luns",
        dependencies=[allow(Role.ADMIN)],
        response_model=LunInfo,
        status_code=201,
        tags=["luns"],
    )
    async def create_lun(body: LunCreate) -> LunInfo:
        size = None if body.size is None else parse_size(body.size)
        lun = array.create_lun(
            body.name,
            size,
            number=body.number,
            read_only=body.read_only,
            path=Path(body.path) if body.path else None,
        )
        return lun_info(lun, nbd)

    @app.get(
        "/v1/luns/{name}", dependencies=[allow(Role.MONITOR)], response_model=LunInfo, tags=["luns"]
    )
    async def show_lun(name: str) -> LunInfo:
        return lun_info(array.lun(name), nbd)

    @app.patch(
        "/v1/luns/{name}", dependencies=[allow(Role.ADMIN)], response_model=LunInfo, tags=["luns"]
    )
    async def update_lun(name: str, body: LunUpdate) -> LunInfo:
        lun = array.lun(name)
        if body.read_only is not None:
            lun = array.set_read_only(name, body.read_only)
        return lun_info(lun, nbd)

    @app.post(
        "/v1/luns/{name}/repoint",
        dependencies=[allow(Role.ADMIN)],
        response_model=LunInfo,
        tags=["luns"],
    )
    async def repoint_lun(name: str, body: LunRepoint) -> LunInfo:
        """Serve the LUN from another existing file of its size; its state token changes."""
        return lun_info(array.repoint_lun(name, Path(body.path)), nbd)

    @app.post(
        "/v1/luns/{name}/grow",
        dependencies=[allow(Role.ADMIN)],
        response_model=LunInfo,
        tags=["luns"],
    )
    async def grow_lun(name: str, body: LunGrow) -> LunInfo:
        return lun_info(array.grow_lun(name, parse_size(body.size)), nbd)

    @app.delete("/v1/luns/{name}", dependencies=[allow(Role.ADMIN)], status_code=204, tags=["luns"])
    async def delete_lun(name: str, force: bool = False) -> Response:
        array.delete_lun(name, force=force)
        return Response(status_code=204)
