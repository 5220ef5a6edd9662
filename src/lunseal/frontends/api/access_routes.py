"""API routes for API tokens (admin only) and the audit trail."""

from __future__ import annotations

from fastapi import FastAPI, Query, Response

from lunseal.engine.access import ApiTokenStore, AuditStore, Role, TokenRecord
from lunseal.frontends.api.auth import allow
from lunseal.schema.access import AuditEntry, TokenCreate, TokenCreated, TokenInfo

#: At most this many audit rows per answer: the trail holds up to 100k.
AUDIT_PAGE_MAX = 10_000


def token_info(rec: TokenRecord) -> TokenInfo:
    return TokenInfo(
        name=rec.name,
        role=rec.role.label,  # type: ignore[arg-type]  # Role labels are the literal's values
        created_at=rec.created_at,
        last_used=rec.last_used,
    )


def install_access_routes(app: FastAPI, tokens: ApiTokenStore, audit: AuditStore) -> None:
    @app.get(
        "/v1/tokens",
        dependencies=[allow(Role.ADMIN)],
        response_model=list[TokenInfo],
        tags=["access"],
    )
    async def list_tokens() -> list[TokenInfo]:
        return [token_info(rec) for rec in tokens.list()]

    @app.post(
        "/v1/tokens",
        dependencies=[allow(Role.ADMIN)],
        response_model=TokenCreated,
        status_code=201,
        tags=["access"],
    )
    async def create_token(body: TokenCreate) -> TokenCreated:
        secret = tokens.create(body.name, Role.parse(body.role))
        rec = next(r for r in tokens.list() if r.name == body.name)
        return TokenCreated(**token_info(rec).model_dump(), secret=secret)

    @app.delete(
        "/v1/tokens/{name}", dependencies=[allow(Role.ADMIN)], status_code=204, tags=["access"]
    )
    async def revoke_token(name: str) -> Response:
        tokens.revoke(name)
        return Response(status_code=204)

    @app.get(
        "/v1/audit",
        dependencies=[allow(Role.MONITOR)],
        response_model=list[AuditEntry],
        tags=["access"],
    )
    async def list_audit(
        since: float = Query(0.0, description="seconds since the epoch"),
        limit: int = Query(1000, ge=1, le=AUDIT_PAGE_MAX),
    ) -> list[AuditEntry]:
        """Audit events at or after ``since``, oldest first (the newest ``limit``)."""
        return [AuditEntry(**vars(rec)) for rec in audit.since(since, limit)]
