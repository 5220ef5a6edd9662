"""API roles: every endpoint, for every role, is allowed or refused with 403,
and every state-changing call lands in the audit trail with its actor."""

from __future__ import annotations

import re
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.routing import APIRoute

from lunseal.engine.access import Role
from lunseal.frontends.api.app import DaemonContext, create_app
from lunseal.frontends.api.auth import ROLE_ATTR
from lunseal.frontends.nbd.server import NbdServer
from tests.support.arrays import Arrays
from tests.support.daemon import Daemon

MON, OPS, ADM = "monitor", "operator", "admin"

#: The specification: the least role each endpoint needs.  A route missing
#: here (or here but gone) fails test_every_endpoint_is_in_the_table.
NEEDS: dict[tuple[str, str], str] = {
    ("GET", "/v1/status"): MON,
    ("GET", "/metrics"): MON,
    ("GET", "/v1/luns"): MON,
    ("POST", "/v1/luns"): ADM,
    ("GET", "/v1/luns/{name}"): MON,
    ("PATCH", "/v1/luns/{name}"): ADM,
    ("DELETE", "/v1/luns/{name}"): ADM,
    ("POST", "/v1/luns/{name}/grow"): ADM,
    ("POST", "/v1/luns/{name}/repoint"): ADM,
    ("GET", "/v1/luns/{name}/state"): MON,
    ("GET", "/v1/luns/{name}/state/token"): MON,
    ("POST", "/v1/luns/{name}/state/check"): MON,
    ("GET", "/v1/luns/{name}/holds"): MON,
    ("POST", "/v1/luns/{name}/holds"): OPS,
    ("DELETE", "/v1/luns/{name}/holds/{hold}"): OPS,
    ("GET", "/v1/luns/{name}/holds/{hold}/changes"): MON,
    ("POST", "/v1/mirrors"): OPS,
    ("GET", "/v1/mirrors"): MON,
    ("GET", "/v1/mirrors/{name}"): MON,
    ("DELETE", "/v1/mirrors/{name}"): ADM,
    ("GET", "/v1/mirrors/{name}/regions"): MON,
    ("POST", "/v1/mirrors/{name}/split"): OPS,
    ("POST", "/v1/mirrors/{name}/resync"): OPS,
    ("POST", "/v1/mirrors/{name}/restore"): OPS,
    ("GET", "/v1/iscsi"): MON,
    ("GET", "/v1/iscsi/initiators/{name}"): MON,
    ("POST", "/v1/iscsi/initiators/{name}"): ADM,
    ("DELETE", "/v1/iscsi/initiators/{name}"): ADM,
    ("PUT", "/v1/iscsi/initiators/{name}/luns/{lun}"): ADM,
    ("DELETE", "/v1/iscsi/initiators/{name}/luns/{lun}"): ADM,
    ("PUT", "/v1/iscsi/initiators/{name}/chap"): ADM,
    ("DELETE", "/v1/iscsi/initiators/{name}/chap"): ADM,
    ("GET", "/v1/tokens"): ADM,
    ("POST", "/v1/tokens"): ADM,
    ("DELETE", "/v1/tokens/{name}"): ADM,
    ("GET", "/v1/audit"): MON,
    ("GET", "/v1/luns/{lun}/nbd-access"): MON,
    ("POST", "/v1/luns/{lun}/nbd-access"): ADM,
    ("DELETE", "/v1/luns/{lun}/nbd-access"): ADM,
}
RANK = {MON: 1, OPS: 2, ADM: 3}


def app_routes(tmp_path: Path) -> list[APIRoute]:
    arrays = Arrays(tmp_path / "data")
    array = arrays.open()
    try:
        app = create_app(DaemonContext(array=array, nbd=NbdServer(array), token="t"))
        return [r for r in app.routes if isinstance(r, APIRoute)]
    finally:
        arrays.close()


def declared_role(route: APIRoute) -> Role | None:
    roles = [getattr(d.call, ROLE_ATTR, None) for d in route.dependant.dependencies]
    found = [r for r in roles if r is not None]
    return found[0] if len(found) == 1 else None


def test_every_route_declares_a_role(tmp_path: Path) -> None:
    routes = app_routes(tmp_path)
    assert routes
    missing = [f"{sorted(r.methods or ())} {r.path}" for r in routes if declared_role(r) is None]
    assert not missing, f"routes without an allow(Role...) dependency: {missing}"


def test_every_endpoint_is_in_the_table(tmp_path: Path) -> None:
    found: dict[tuple[str, str], str | None] = {}
    for route in app_routes(tmp_path):
        role = declared_role(route)
        for method in route.methods or ():
            found[(method, route.path)] = role.label if role else None
    assert found == NEEDS


# -- against a real daemon ---------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("roles") / "home").start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


def client(d: Daemon, token: str) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"}
    return httpx.Client(base_url=d.api_url, headers=headers, timeout=30)


@pytest.fixture(scope="module")
def secrets_by_role(daemon: Daemon) -> dict[str, str]:
    out = {ADM: daemon.token}
    with client(daemon, daemon.token) as admin:
        for role in (MON, OPS):
            r = admin.post("/v1/tokens", json={"name": f"t-{role}", "role": role})
            assert r.status_code == 201, r.text
            out[role] = r.json()["secret"]
    return out


def concrete(path: str) -> str:
    """Route parameters name things that do not exist: an allowed call then
    fails with 404/400/409, never with 403, and a refused one changes nothing."""
    return re.sub(r"\{(\w+)\}", lambda m: f"nosuch-{m.group(1)}", path)


@pytest.mark.daemon
@pytest.mark.parametrize("role", [MON, OPS, ADM])
def test_each_role_on_every_endpoint(
    daemon: Daemon, secrets_by_role: dict[str, str], role: str
) -> None:
    since = time.time() - 1
    expect_audited = []
    with client(daemon, secrets_by_role[role]) as http:
        for (method, path), needs in sorted(NEEDS.items()):
            body: dict[str, object] | None = None if method in ("GET", "DELETE") else {}
            r = http.request(method, concrete(path), json=body)
            allowed = RANK[role] >= RANK[needs]
            assert r.status_code != 401, (method, path, r.text)
            if allowed:
                assert r.status_code != 403, (role, method, path, r.text)
            else:
                assert r.status_code == 403, (role, method, path, r.text)
                assert r.json()["error"] == "forbidden"
                assert needs in r.json()["message"]
            if method != "GET":
                expect_audited.append((f"{method} {path}", str(r.status_code)))
    with client(daemon, daemon.token) as admin:
        events = admin.get("/v1/audit", params={"since": since}).json()
    mine = [
        (e["action"], e["result"])
        for e in events
        if e["actor"] == f"t-{role}" or (role == ADM and e["actor"] == "admin")
    ]
    for item in expect_audited:
        assert item in mine, (item, mine)


@pytest.mark.daemon
def test_operator_does_backup_work_and_is_audited(
    daemon: Daemon, secrets_by_role: dict[str, str]
) -> None:
    with client(daemon, daemon.token) as admin:
        assert admin.post("/v1/luns", json={"name": "r-src", "size": "1M"}).status_code == 201
    since = time.time() - 1
    with client(daemon, secrets_by_role[OPS]) as op:
        r = op.post("/v1/luns/r-src/holds", json={"hold": "bk"})
        assert r.status_code == 201, r.text
        token = r.json()["token"]
        check = op.post("/v1/luns/r-src/state/check", json={"token": token})
        assert check.json()["result"] == "intact", check.text
        body = {"source": "r-src", "target": "r-tgt", "create_target": True}
        r = op.post("/v1/mirrors", json=body)
        assert r.status_code == 201, r.text
        # ...but not LUN management: refused, and nothing changed.
        assert op.post("/v1/luns/r-src/grow", json={"size": "2M"}).status_code == 403
        assert op.delete("/v1/luns/r-src").status_code == 403
    with client(daemon, daemon.token) as admin:
        assert admin.get("/v1/luns/r-src").json()["size"] == 1 << 20
        events = admin.get("/v1/audit", params={"since": since}).json()
    seen = {(e["actor"], e["action"], e["target"], e["result"]) for e in events}
    assert ("t-operator", "POST /v1/luns/{name}/holds", "name=r-src", "201") in seen
    assert ("t-operator", "POST /v1/mirrors", "/v1/mirrors", "201") in seen
    denied = [e for e in events if e["action"] == "POST /v1/luns/{name}/grow"]
    assert denied
    assert denied[-1]["result"] == "403"
    assert "admin" in denied[-1]["detail"]


@pytest.mark.daemon
def test_unknown_revoked_and_missing_tokens_get_401(daemon: Daemon) -> None:
    with client(daemon, daemon.token) as admin:
        r = admin.post("/v1/tokens", json={"name": "short-lived", "role": "admin"})
        secret = r.json()["secret"]
        listed = admin.get("/v1/tokens").json()
        assert next(t for t in listed if t["name"] == "short-lived")["role"] == "admin"
        assert all("secret" not in t and "hash" not in t for t in listed)
        assert secret not in admin.get("/v1/tokens").text
        dup = admin.post("/v1/tokens", json={"name": "short-lived", "role": "monitor"})
        assert dup.status_code == 409
        assert admin.post("/v1/tokens", json={"name": "x", "role": "root"}).status_code == 400
    with client(daemon, secret) as http:
        assert http.get("/v1/luns").status_code == 200
    with client(daemon, daemon.token) as admin:
        assert admin.delete("/v1/tokens/short-lived").status_code == 204
        assert admin.delete("/v1/tokens/short-lived").status_code == 404
    since = time.time()  # the same clock as the daemon's
    for bad in (secret, "lst1.00.zz", "x", secret[:-1] + "A", None):
        headers = {} if bad is None else {"Authorization": f"Bearer {bad}"}
        r = httpx.post(
            f"{daemon.api_url}/v1/luns", json={"name": "nope", "size": "1M"}, headers=headers
        )
        assert r.status_code == 401, (bad, r.text)
    with client(daemon, daemon.token) as admin:
        events = admin.get("/v1/audit", params={"since": since}).json()
        assert [e["actor"] for e in events if e["action"] == "POST /v1/luns"] == ["-"] * 5
        assert admin.get("/v1/luns/nope").status_code == 404


@pytest.mark.daemon
def test_tokens_are_stored_hashed(daemon: Daemon) -> None:
    with client(daemon, daemon.token) as admin:
        secret = admin.post("/v1/tokens", json={"name": "hashed", "role": "monitor"}).json()[
            "secret"
        ]
    raw = b""
    for name in ("catalog.sqlite", "catalog.sqlite-wal"):
        path = daemon.home / name
        if path.exists():
            raw += path.read_bytes()
    assert secret.encode() not in raw
    assert secret.split(".")[2].encode() not in raw
    db = sqlite3.connect(f"file:{daemon.home / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        rows = db.execute("SELECT hash FROM api_tokens WHERE name = 'hashed'").fetchall()
    finally:
        db.close()
    assert len(rows) == 1
    assert secret not in rows[0][0]
