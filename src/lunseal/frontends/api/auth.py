"""Who is calling (bearer tokens), what their role lets them do, and the audit trail.

Authentication is a middleware, so a request without a valid token is refused
before any routing, validation or handler runs.  Authorisation is a FastAPI
dependency every route declares (:func:`allow`); a test walks the app's routes
so a route without one cannot ship.  Every request that may change state (any
method but GET/HEAD) is recorded in the audit trail with its outcome,
refusals included.
"""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.params import Depends as DependsParam

from lunseal.engine.access import BOOTSTRAP_NAME, ApiTokenStore, AuditStore, Principal, Role
from lunseal.errors import Forbidden, LunsealError, Unauthorized

#: Requests with these methods change nothing and are not audited.
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The attribute :func:`allow` puts on its dependency, for the route walk in the tests.
ROLE_ATTR = "lunseal_role"
_ANONYMOUS = "-"


def allow(role: Role) -> DependsParam:
    """The dependency a route declares: callers need ``role`` or a higher one."""

    async def check(request: Request) -> None:
        who: Principal = request.state.principal
        if who.role < role:
            raise Forbidden(
                f"token {who.name!r} has role {who.role.label}; "
                f"{request.method} {request.url.path} needs {role.label}"
            )

    setattr(check, ROLE_ATTR, role)
    dependency: DependsParam = Depends(check)
    return dependency


def note_error(request: Request, exc: LunsealError) -> None:
    """Keep a refusal's message for the audit record of this request."""
    request.state.audit_error = exc.message


def install_auth(
    app: FastAPI,
    bootstrap_token: str,
    tokens: ApiTokenStore,
    audit: AuditStore,
    refuse: Callable[[LunsealError], Response],
) -> None:
    expected = bootstrap_token.encode()

    def principal(header: str) -> Principal | None:
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        # The first-start token is compared in constant time whatever is given.
        if secrets.compare_digest(given.encode(), expected):
            return Principal(BOOTSTRAP_NAME, Role.ADMIN)
        return tokens.authenticate(given)

    @app.middleware("http")
    async def authenticate(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        who = principal(request.headers.get("authorization", ""))
        if who is None:
            exc = Unauthorized("missing or wrong API token")
            note_error(request, exc)
            response = refuse(exc)
        else:
            request.state.principal = who
            try:
                response = await call_next(request)
            except Exception as exc:
                # A bug, answered 500 further out: the attempt is still on record.
                if request.method not in READ_METHODS:
                    request.state.audit_error = f"internal error: {type(exc).__name__}"
                    _record(audit, request, who, 500)
                raise
        if request.method not in READ_METHODS:
            _record(audit, request, who, response.status_code)
        return response


def _record(audit: AuditStore, request: Request, who: Principal | None, status: int) -> None:
    route: Any = request.scope.get("route")
    template = getattr(route, "path", None) or request.url.path
    params = request.scope.get("path_params") or {}
    state = request.scope.get("state") or {}
    audit.record(
        actor=who.name if who is not None else _ANONYMOUS,
        action=f"{request.method} {template}",
        target=",".join(f"{k}={v}" for k, v in params.items()) or request.url.path,
        result=str(status),
        detail=str(state.get("audit_error", "")),
    )
