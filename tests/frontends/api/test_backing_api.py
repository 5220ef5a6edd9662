"""Backing files over the API: the data directory is never a LUN, one file backs one
LUN, and re-pointing changes the LUN's state token."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from tests.frontends.api.test_api import assert_error, create
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20


@pytest.mark.parametrize("name", ["catalog.sqlite", "api-token", "lock", "luns/new.img"])
def test_no_file_of_the_data_directory_becomes_a_lun(
    api_daemon: Daemon, http: httpx.Client, name: str
) -> None:
    target = api_daemon.home / name
    size = None if target.exists() else "1M"
    body = {"name": "evil", "size": size, "path": str(target)}
    error = assert_error(http.post("/v1/luns", json=body), 400, "invalid_argument")
    assert str(api_daemon.home) in error["message"]
    assert_error(http.get("/v1/luns/evil"), 404, "not_found")


def test_aliases_of_a_used_file_are_409(http: httpx.Client, tmp_path: Path) -> None:
    disk = tmp_path / "disk.img"
    disk.write_bytes(bytes(MiB))
    os.link(disk, tmp_path / "hard.img")
    (tmp_path / "sub").mkdir()
    create(http, "alias-owner", None, path=str(disk))
    try:
        for alias in (tmp_path / "hard.img", tmp_path / "sub" / ".." / "disk.img"):
            body = {"name": "alias", "path": str(alias)}
            error = assert_error(http.post("/v1/luns", json=body), 409, "conflict")
            assert "LUN alias-owner" in error["message"]
        (tmp_path / "link.img").symlink_to(disk)
        body = {"name": "alias", "path": str(tmp_path / "link.img")}
        assert_error(http.post("/v1/luns", json=body), 400, "invalid_argument")
    finally:
        http.delete("/v1/luns/alias-owner")


def test_repoint_changes_the_token_and_is_checked(http: httpx.Client, tmp_path: Path) -> None:
    first, second, small = (tmp_path / n for n in ("first.img", "second.img", "small.img"))
    first.write_bytes(bytes(MiB))
    second.write_bytes(bytes(MiB))
    small.write_bytes(bytes(MiB // 2))
    create(http, "moving", None, path=str(first))
    try:
        hold = http.post("/v1/luns/moving/holds", json={"hold": "b"}).json()
        for bad, status, code in (
            (small, 400, "invalid_argument"),
            (tmp_path / "missing.img", 400, "invalid_argument"),
            (first, 400, "invalid_argument"),
        ):
            response = http.post("/v1/luns/moving/repoint", json={"path": str(bad)})
            assert_error(response, status, code)
        response = http.post("/v1/luns/moving/repoint", json={"path": str(second)})
        assert response.status_code == 200, response.text
        info = response.json()
        assert info["path"] == str(second)
        assert info["available"] is True
        assert info["unavailable_reason"] is None
        check = http.post("/v1/luns/moving/state/check", json={"token": hold["token"]}).json()
        assert check["result"] == "changed"
        assert "re-pointed" in check["reason"]
    finally:
        http.delete("/v1/luns/moving")
    assert first.exists()
    assert second.exists()
