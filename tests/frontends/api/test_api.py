"""The management API over real HTTP against a real daemon."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20
NBDMAGIC = b"NBDMAGIC"
IHAVEOPT = b"IHAVEOPT"
NBD_OPT_EXPORT_NAME = 1
NBD_FLAG_NO_ZEROES = 2


def snapshot(http: httpx.Client) -> list[tuple[str, int, bool]]:
    return [(lun["name"], lun["size"], lun["read_only"]) for lun in http.get("/v1/luns").json()]


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert body["message"]
    return body


def create(http: httpx.Client, name: str, size: str | int | None = "1M", **extra: object) -> Any:
    response = http.post("/v1/luns", json={"name": name, "size": size, **extra})
    assert response.status_code == 201, response.text
    return response.json()


# -- authentication -----------------------------------------------------------------------

#: Requests that would succeed (and change the array) with the right token.
ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/status", None),
    ("GET", "/v1/luns", None),
    ("POST", "/v1/luns", {"name": "intruder", "size": "1M"}),
    ("GET", "/v1/luns/demo", None),
    ("PATCH", "/v1/luns/demo", {"read_only": True}),
    ("POST", "/v1/luns/demo/grow", {"size": "2G"}),
    ("POST", "/v1/luns/demo/repoint", {"path": "/tmp/intruder.img"}),
    ("DELETE", "/v1/luns/demo?force=true", None),
    ("GET", "/openapi.json", None),
    ("GET", "/docs", None),
    ("GET", "/redoc", None),
    ("GET", "/no/such/path", None),
]

BAD_AUTH: dict[str, dict[str, str]] = {
    "none": {},
    "wrong": {"Authorization": "Bearer wrong"},
    "scheme-only": {"Authorization": "Bearer"},
    "basic": {"Authorization": "Basic dXNlcjpwYXNz"},
}


@pytest.fixture(params=list(BAD_AUTH))
def bad_auth(request: pytest.FixtureRequest) -> dict[str, str]:
    return BAD_AUTH[request.param]


@pytest.mark.parametrize(("method", "path", "body"), ROUTES, ids=[f"{m} {p}" for m, p, _ in ROUTES])
def test_every_route_needs_the_token(
    api_daemon: Daemon,
    http: httpx.Client,
    bad_auth: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    before = snapshot(http)
    response = httpx.request(method, api_daemon.api_url + path, json=body, headers=bad_auth)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    assert snapshot(http) == before


@pytest.mark.parametrize("variant", ["prefix", "suffix", "no-scheme", "double-space"])
def test_near_miss_tokens_are_refused(api_daemon: Daemon, variant: str) -> None:
    token = api_daemon.token
    header = {
        "prefix": f"Bearer x{token}",
        "suffix": f"Bearer {token}x",
        "no-scheme": token,
        "double-space": f"Bearer  {token}",
    }[variant]
    response = httpx.get(api_daemon.api_url + "/v1/status", headers={"Authorization": header})
    assert_error(response, 401, "unauthorized")


def test_every_documented_route_needs_the_token(api_daemon: Daemon, http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    before = snapshot(http)
    checked = 0
    for template, operations in paths.items():
        path = template.replace("{name}", "demo")
        for method in operations:
            response = httpx.request(method.upper(), api_daemon.api_url + path, json={})
            assert_error(response, 401, "unauthorized")
            checked += 1
    assert checked >= 7
    assert snapshot(http) == before


def test_the_right_token_is_accepted(http: httpx.Client) -> None:
    assert http.get("/v1/status").status_code == 200


# -- the OpenAPI document ---------------------------------------------------------------------


def test_openapi_lists_the_routes(http: httpx.Client) -> None:
    paths = http.get("/openapi.json").json()["paths"]
    found = {(path, method) for path, ops in paths.items() for method in ops}
    assert {
        ("/v1/status", "get"),
        ("/v1/luns", "get"),
        ("/v1/luns", "post"),
        ("/v1/luns/{name}", "get"),
        ("/v1/luns/{name}", "patch"),
        ("/v1/luns/{name}", "delete"),
        ("/v1/luns/{name}/grow", "post"),
    } <= found


def test_openapi_documents_the_error_shape(http: httpx.Client) -> None:
    doc = http.get("/openapi.json").json()
    assert set(doc["components"]["schemas"]["ErrorBody"]["required"]) == {"error", "message"}
    assert "404" in doc["paths"]["/v1/luns/{name}"]["get"]["responses"]


# -- invalid requests -------------------------------------------------------------------------

INVALID_CREATES: dict[str, Any] = {
    "dotdot-name": {"name": "../x", "size": "1M"},
    "slash-name": {"name": "a/b", "size": "1M"},
    "empty-name": {"name": "", "size": "1M"},
    "dot-name": {"name": ".hidden", "size": "1M"},
    "dash-name": {"name": "-rf", "size": "1M"},
    "nul-name": {"name": "a\0b", "size": "1M"},
    "newline-name": {"name": "bad\n", "size": "1M"},
    "long-name": {"name": "n" * 65, "size": "1M"},
    "int-name": {"name": 5, "size": "1M"},
    "missing-name": {"size": "1M"},
    "unit-size": {"name": "bad", "size": "12Q"},
    "zero-size": {"name": "bad", "size": 0},
    "zero-text-size": {"name": "bad", "size": "0"},
    "negative-size": {"name": "bad", "size": -1},
    "negative-text-size": {"name": "bad", "size": "-1"},
    "unaligned-size": {"name": "bad", "size": 1000},
    "fraction-size": {"name": "bad", "size": "1.5G"},
    "float-size": {"name": "bad", "size": 1.5},
    "list-size": {"name": "bad", "size": [1]},
    "huge-size": {"name": "bad", "size": "2048P"},
    "missing-size": {"name": "bad"},
    "negative-number": {"name": "bad", "size": "1M", "number": -1},
    "large-number": {"name": "bad", "size": "1M", "number": 16384},
    "text-number": {"name": "bad", "size": "1M", "number": "one"},
    "relative-path": {"name": "bad", "size": "1M", "path": "disk.img"},
    "not-an-object": ["bad", "1M"],
}


@pytest.mark.parametrize("body", INVALID_CREATES.values(), ids=list(INVALID_CREATES))
def test_invalid_create_is_400_and_creates_nothing(http: httpx.Client, body: Any) -> None:
    before = snapshot(http)
    assert_error(http.post("/v1/luns", json=body), 400, "invalid_argument")
    assert snapshot(http) == before


def test_malformed_json_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/luns", content=b'{"name": ', headers={"content-type": "application/json"}
    )
    assert_error(response, 400, "invalid_argument")


@pytest.fixture
def small_lun(http: httpx.Client, request: pytest.FixtureRequest) -> Iterator[str]:
    name = f"t-{request.node.name}".replace("[", "-").replace("]", "")[:64]
    create(http, name, "1M")
    yield name
    http.delete(f"/v1/luns/{name}", params={"force": "true"})


@pytest.mark.parametrize("size", ["12Q", "512K", "1M", MiB + 1000, 0, -1, None])
def test_invalid_grow_is_400_and_keeps_the_size(
    http: httpx.Client, small_lun: str, size: object
) -> None:
    response = http.post(f"/v1/luns/{small_lun}/grow", json={"size": size})
    assert_error(response, 400, "invalid_argument")
    assert http.get(f"/v1/luns/{small_lun}").json()["size"] == MiB


def test_invalid_patch_is_400(http: httpx.Client, small_lun: str) -> None:
    response = http.patch(f"/v1/luns/{small_lun}", json={"read_only": "maybe"})
    assert_error(response, 400, "invalid_argument")
    assert http.get(f"/v1/luns/{small_lun}").json()["read_only"] is False


def test_invalid_force_flag_is_400(http: httpx.Client, small_lun: str) -> None:
    response = http.delete(f"/v1/luns/{small_lun}", params={"force": "maybe"})
    assert_error(response, 400, "invalid_argument")
    assert http.get(f"/v1/luns/{small_lun}").status_code == 200


# -- not found, conflicts ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/v1/luns/nope", None),
        ("PATCH", "/v1/luns/nope", {"read_only": True}),
        ("POST", "/v1/luns/nope/grow", {"size": "2M"}),
        ("POST", "/v1/luns/nope/repoint", {"path": "/tmp/x.img"}),
        ("DELETE", "/v1/luns/nope", None),
        ("GET", "/v1/luns/a%2Fb", None),
        ("GET", "/v1/no-such-route", None),
    ],
)
def test_unknown_lun_or_route_is_404(
    http: httpx.Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    assert_error(http.request(method, path, json=body), 404, "not_found")


def test_wrong_method_keeps_the_error_shape(http: httpx.Client) -> None:
    response = http.delete("/v1/luns")
    assert response.status_code == 405
    assert set(response.json()) == {"error", "message"}


def test_duplicate_name_is_409(http: httpx.Client, small_lun: str) -> None:
    assert_error(http.post("/v1/luns", json={"name": small_lun, "size": "2M"}), 409, "conflict")
    assert http.get(f"/v1/luns/{small_lun}").json()["size"] == MiB


def test_duplicate_number_is_409(http: httpx.Client, small_lun: str) -> None:
    number = http.get(f"/v1/luns/{small_lun}").json()["number"]
    response = http.post("/v1/luns", json={"name": "dup-number", "size": "1M", "number": number})
    assert_error(response, 409, "conflict")
    assert http.get("/v1/luns/dup-number").status_code == 404


# -- the life of a LUN ------------------------------------------------------------------------


def test_create_returns_201_and_the_lun(api_daemon: Daemon, http: httpx.Client) -> None:
    info = create(http, "life-create", "3M", number=42)
    assert (info["name"], info["size"], info["number"], info["read_only"]) == (
        "life-create",
        3 * MiB,
        42,
        False,
    )
    assert info["backend"] == "file"
    assert Path(info["path"]).parent == api_daemon.home / "luns"
    assert f"nbd+unix:///life-create?socket={api_daemon.socket}" in info["nbd_uris"]
    assert f"nbd://{api_daemon.tcp}/life-create" in info["nbd_uris"]
    assert info["connections"] == 0
    assert set(info["stats"].values()) == {0}
    assert http.get("/v1/luns/life-create").json() == info
    assert info in http.get("/v1/luns").json()


def test_create_read_only(http: httpx.Client) -> None:
    assert create(http, "life-ro", 4096, read_only=True)["read_only"] is True


def test_grow(http: httpx.Client, small_lun: str) -> None:
    response = http.post(f"/v1/luns/{small_lun}/grow", json={"size": "5M"})
    assert response.status_code == 200
    assert response.json()["size"] == 5 * MiB
    assert http.get(f"/v1/luns/{small_lun}").json()["size"] == 5 * MiB


def test_patch_read_only_and_back(http: httpx.Client, small_lun: str) -> None:
    path = f"/v1/luns/{small_lun}"
    assert http.patch(path, json={"read_only": True}).json()["read_only"] is True
    assert http.get(path).json()["read_only"] is True
    assert http.patch(path, json={}).json()["read_only"] is True
    assert http.patch(path, json={"read_only": False}).json()["read_only"] is False


def test_delete_is_204_and_removes_the_backing_file(http: httpx.Client) -> None:
    backing = Path(create(http, "life-delete")["path"])
    response = http.delete("/v1/luns/life-delete")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(http.get("/v1/luns/life-delete"), 404, "not_found")
    assert not backing.exists()


def test_external_file_is_kept_on_delete(http: httpx.Client, tmp_path: Path) -> None:
    disk = tmp_path / "external.img"
    disk.write_bytes(bytes(MiB))
    info = create(http, "life-external", None, path=str(disk))
    assert info["size"] == MiB
    assert http.delete("/v1/luns/life-external").status_code == 204
    assert disk.stat().st_size == MiB


def test_status_describes_the_daemon(api_daemon: Daemon, http: httpx.Client) -> None:
    status = http.get("/v1/status").json()
    assert status["api_url"] == api_daemon.api_url
    assert status["nbd"] == {"tcp": api_daemon.tcp, "unix": api_daemon.socket}
    assert status["data_dir"] == str(api_daemon.home)
    assert status["luns"] == len(http.get("/v1/luns").json())
    assert status["last_shutdown_clean"] is True


# -- a LUN in use -------------------------------------------------------------------------------


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError(f"closed after {len(data)} of {n} bytes")
        data += chunk
    return data


def attach(unix_path: str, export: str) -> socket.socket:
    """An NBD client that negotiates ``export`` (NBD_OPT_EXPORT_NAME) and stays attached."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(unix_path)
    greeting = recv_exactly(sock, 18)
    assert greeting[:16] == NBDMAGIC + IHAVEOPT
    (server_flags,) = struct.unpack(">H", greeting[16:])
    sock.sendall(struct.pack(">I", 0x3))
    name = export.encode()
    sock.sendall(IHAVEOPT + struct.pack(">II", NBD_OPT_EXPORT_NAME, len(name)) + name)
    reply = recv_exactly(sock, 10 if server_flags & NBD_FLAG_NO_ZEROES else 134)
    (size,) = struct.unpack(">Q", reply[:8])
    assert size > 0
    return sock


@pytest.fixture
def attached(api_daemon: Daemon, http: httpx.Client) -> Iterator[socket.socket]:
    create(http, "busy", "1M")
    sock = attach(api_daemon.socket, "busy")
    yield sock
    sock.close()
    http.delete("/v1/luns/busy", params={"force": "true"})


def test_a_connected_lun_shows_its_connection(http: httpx.Client, attached: socket.socket) -> None:
    assert http.get("/v1/luns/busy").json()["connections"] == 1
    assert http.get("/v1/status").json()["connections"] >= 1


def test_delete_is_refused_while_a_client_is_connected(
    http: httpx.Client, attached: socket.socket
) -> None:
    body = assert_error(http.delete("/v1/luns/busy"), 409, "conflict")
    assert "force" in body["message"]
    assert http.get("/v1/luns/busy").status_code == 200


def test_forced_delete_disconnects_the_client(http: httpx.Client, attached: socket.socket) -> None:
    assert http.delete("/v1/luns/busy", params={"force": "true"}).status_code == 204
    assert http.get("/v1/luns/busy").status_code == 404
    assert attached.recv(1) == b""
