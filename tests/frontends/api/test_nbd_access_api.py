"""The NBD export ACL routes over real HTTP against a real daemon: entries in and
out, 201 only on a change, clear errors, a LUN re-created under its name starts
open, and entries survive a restart."""

from __future__ import annotations

import itertools
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon
_names = itertools.count()


@pytest.fixture
def lun(http: httpx.Client) -> str:
    name = f"na{next(_names)}"
    assert http.post("/v1/luns", json={"name": name, "size": "1M"}).status_code == 201
    return name


def test_allow_list_remove(http: httpx.Client, lun: str) -> None:
    path = f"/v1/luns/{lun}/nbd-access"
    assert http.get(path).json() == {"lun": lun, "open": True, "entries": []}
    first = http.post(path, json={"client": "net:10.1.2.3/8", "access": "ro"})
    assert first.status_code == 201
    assert first.json()["entries"] == [{"client": "net:10.0.0.0/8", "access": "ro"}]
    assert http.post(path, json={"client": "net:10.0.0.0/8", "access": "ro"}).status_code == 200
    http.post(path, json={"client": "cert:host1.example"})  # rw by default
    body = http.get(path).json()
    assert body["open"] is False
    assert body["entries"] == [
        {"client": "cert:host1.example", "access": "rw"},
        {"client": "net:10.0.0.0/8", "access": "ro"},
    ]
    after = http.delete(path, params={"client": "net:10.0.0.0/8"}).json()
    assert after["entries"] == [{"client": "cert:host1.example", "access": "rw"}]
    assert http.delete(path).json() == {"lun": lun, "open": True, "entries": []}


@pytest.mark.parametrize(
    ("body", "status", "match"),
    [
        ({"client": "10.0.0.1"}, 400, "invalid NBD client"),
        ({"client": "net:fe80::/129"}, 400, "invalid address range"),
        ({"client": "uid:-3"}, 400, "invalid uid"),
        ({"client": "uid:3", "access": "rwx"}, 400, "should be 'ro' or 'rw'"),
    ],
)
def test_bad_entries(
    http: httpx.Client, lun: str, body: dict[str, str], status: int, match: str
) -> None:
    response = http.post(f"/v1/luns/{lun}/nbd-access", json=body)
    assert response.status_code == status, response.text
    assert match in response.text
    assert http.get(f"/v1/luns/{lun}/nbd-access").json()["open"] is True


def test_unknown_lun_and_entry_are_404(http: httpx.Client, lun: str) -> None:
    assert http.get("/v1/luns/nope/nbd-access").status_code == 404
    missing = http.delete(f"/v1/luns/{lun}/nbd-access", params={"client": "uid:5"})
    assert missing.status_code == 404


def test_entries_survive_a_restart_and_not_a_re_creation(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home").start()
    try:
        with daemon.client() as api:
            api.create_lun("keep", "1M")
            api.create_lun("again", "1M")
            api.allow_nbd("keep", "uid:1234", "ro")
            api.allow_nbd("again", "uid:1234", "rw")
            api.delete_lun("again")
            api.create_lun("again", "1M")
            assert api.nbd_access("again").open
        assert daemon.stop() == 0
        daemon.start()
        with daemon.client() as api:
            kept = api.nbd_access("keep")
            assert [(e.client, e.access) for e in kept.entries] == [("uid:1234", "ro")]
            assert api.nbd_access("again").open
    finally:
        daemon.kill()
