"""The iSCSI ACL routes over real HTTP against a real daemon: secrets go in and
never come out, bad names and short secrets are 400s, changes survive a restart."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

SECRET = "secret-of-16-chr"
MUTUAL = "mutual-secret-16"
_names = itertools.count()


@pytest.fixture
def host(http: httpx.Client) -> Iterator[str]:
    """An initiator name of this test's own, removed again (the daemon is shared)."""
    name = f"iqn.2026-12.test.api:h{next(_names)}"
    yield name
    http.delete(f"/v1/iscsi/initiators/{name}")


@pytest.fixture
def luns(http: httpx.Client) -> list[str]:
    names = [f"ia{next(_names)}", f"ia{next(_names)}"]
    for name in names:
        assert http.post("/v1/luns", json={"name": name, "size": "1M"}).status_code == 201
    return names


def ok(response: httpx.Response, status: int = 200) -> Any:
    assert response.status_code == status, response.text
    return response.json()


def error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == code
    return str(body["message"])


def test_open_until_an_initiator_is_allowed(
    http: httpx.Client, host: str, api_daemon: Daemon
) -> None:
    info = ok(http.get("/v1/iscsi"))
    assert info["target"] == api_daemon.iscsi_target
    assert info["portal"] == api_daemon.iscsi_portal
    assert info["open"] is True
    assert info["initiators"] == []
    created = ok(http.post(f"/v1/iscsi/initiators/{host}", json={}), 201)
    assert created == {
        "name": host,
        "created_at": created["created_at"],
        "all_luns": True,
        "luns": [],
        "chap_user": None,
        "mutual_user": None,
    }
    info = ok(http.get("/v1/iscsi"))
    assert info["open"] is False
    assert [i["name"] for i in info["initiators"]] == [host]
    assert http.delete(f"/v1/iscsi/initiators/{host}").status_code == 204
    assert ok(http.get("/v1/iscsi"))["open"] is True


def test_secrets_are_never_returned(http: httpx.Client, host: str) -> None:
    body = {"chap": {"user": "h", "secret": SECRET}, "mutual": {"user": "t", "secret": MUTUAL}}
    answers = [
        http.post(f"/v1/iscsi/initiators/{host}", json=body),
        http.get("/v1/iscsi"),
        http.get(f"/v1/iscsi/initiators/{host}"),
        http.put(f"/v1/iscsi/initiators/{host}/chap", json=body),
    ]
    for answer in answers:
        assert answer.status_code in (200, 201), answer.text
        assert SECRET not in answer.text
        assert MUTUAL not in answer.text
    info = ok(http.get(f"/v1/iscsi/initiators/{host}"))
    assert (info["chap_user"], info["mutual_user"]) == ("h", "t")
    openapi = http.get("/openapi.json").json()
    shown = json.dumps(openapi["components"]["schemas"]["InitiatorInfo"])
    assert "secret" not in shown


def test_masking_by_lun_name(http: httpx.Client, host: str, luns: list[str]) -> None:
    a, b = luns
    info = ok(http.post(f"/v1/iscsi/initiators/{host}", json={"luns": {a: "ro"}}), 201)
    assert info["all_luns"] is False
    assert [(x["lun"], x["access"]) for x in info["luns"]] == [(a, "ro")]
    info = ok(http.put(f"/v1/iscsi/initiators/{host}/luns/{b}", json={"access": "rw"}))
    assert [(x["lun"], x["access"]) for x in info["luns"]] == [(a, "ro"), (b, "rw")]
    info = ok(http.delete(f"/v1/iscsi/initiators/{host}/luns/{a}"))
    assert [x["lun"] for x in info["luns"]] == [b]
    # Deleting the LUN removes it from every ACL.
    assert http.delete(f"/v1/luns/{b}").status_code == 204
    assert ok(http.get(f"/v1/iscsi/initiators/{host}"))["luns"] == []


def test_hiding_a_lun_from_an_initiator_that_sees_all_is_a_conflict(
    http: httpx.Client, host: str, luns: list[str]
) -> None:
    ok(http.post(f"/v1/iscsi/initiators/{host}", json={}), 201)
    message = error(http.delete(f"/v1/iscsi/initiators/{host}/luns/{luns[0]}"), 409, "conflict")
    assert "sees every LUN" in message


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ({"chap": {"user": "h", "secret": "short"}}, "at least 12"),
        ({"mutual": {"user": "t", "secret": MUTUAL}}, "needs one-way CHAP"),
        (
            {"chap": {"user": "h", "secret": SECRET}, "mutual": {"user": "t", "secret": SECRET}},
            "must differ",
        ),
        ({"luns": {"nope": "ro"}}, "no LUN named"),
        ({"luns": {"x": "rx"}}, "invalid request"),
    ],
)
def test_bad_requests(http: httpx.Client, host: str, body: dict[str, Any], match: str) -> None:
    response = http.post(f"/v1/iscsi/initiators/{host}", json=body)
    assert response.status_code in (400, 404), response.text
    assert match in response.json()["message"]
    assert http.get(f"/v1/iscsi/initiators/{host}").status_code == 404  # nothing stored


def test_bad_names(http: httpx.Client) -> None:
    message = error(http.post("/v1/iscsi/initiators/host1", json={}), 400, "invalid_argument")
    assert "invalid iSCSI name" in message
    error(http.delete("/v1/iscsi/initiators/iqn.2026-12.test.api:absent"), 404, "not_found")
    error(
        http.put("/v1/iscsi/initiators/iqn.2026-12.test.api:absent/luns/x", json={"access": "ro"}),
        404,
        "not_found",
    )


def test_acl_survives_a_restart(tmp_path: Path) -> None:
    d = Daemon(tmp_path / "home").start()
    try:
        headers = {"Authorization": f"Bearer {d.token}"}
        name = "iqn.2026-12.test.api:persist"
        with httpx.Client(base_url=d.api_url, headers=headers, timeout=30) as http:
            body = {"luns": {"demo": "ro"}, "chap": {"user": "p", "secret": SECRET}}
            ok(http.post(f"/v1/iscsi/initiators/{name}", json=body), 201)
        assert d.stop() == 0
        d.start()
        with httpx.Client(base_url=d.api_url, headers=headers, timeout=30) as http:
            info = ok(http.get(f"/v1/iscsi/initiators/{name}"))
        assert info["chap_user"] == "p"
        assert [(x["lun"], x["access"]) for x in info["luns"]] == [("demo", "ro")]
    finally:
        d.kill()
