"""ArrayClient: typed calls, and every API error rebuilt as the class the daemon raised."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.errors import (
    Conflict,
    DaemonUnavailable,
    InvalidArgument,
    LunsealError,
    NotFound,
    Unauthorized,
)
from lunseal.host.client import ArrayClient
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20


@pytest.fixture
def api(api_daemon: Daemon) -> Iterator[ArrayClient]:
    with api_daemon.client() as client:
        yield client


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_lifecycle(api: ArrayClient) -> None:
    created = api.create_lun("client-life", "2M", number=77)
    assert (created.size, created.number) == (2 * MiB, 77)
    assert api.show_lun("client-life") == created
    assert api.grow_lun("client-life", 4 * MiB).size == 4 * MiB
    assert api.update_lun("client-life", read_only=True).read_only
    assert api.update_lun("client-life").read_only
    assert "client-life" in [lun.name for lun in api.list_luns()]
    api.delete_lun("client-life")
    with pytest.raises(NotFound):
        api.show_lun("client-life")


def test_status(api_daemon: Daemon, api: ArrayClient) -> None:
    status = api.status()
    assert status.api_url == api_daemon.api_url
    assert status.nbd.unix == api_daemon.socket


@pytest.mark.parametrize("name", ["nope", "a/b", "a b", "a%2Fb", "..", "x?y=1"])
def test_unknown_names_are_not_found(api: ArrayClient, name: str) -> None:
    with pytest.raises(NotFound):
        api.show_lun(name)


def test_invalid_arguments_keep_their_class_and_message(api: ArrayClient) -> None:
    with pytest.raises(InvalidArgument, match="invalid size '12Q'"):
        api.create_lun("client-bad", "12Q")
    with pytest.raises(InvalidArgument, match="invalid LUN name"):
        api.create_lun("../x", "1M")


def test_conflict(api: ArrayClient) -> None:
    api.create_lun("client-dup", "1M")
    try:
        with pytest.raises(Conflict):
            api.create_lun("client-dup", "1M")
    finally:
        api.delete_lun("client-dup")


def test_wrong_token_is_unauthorized(api_daemon: Daemon) -> None:
    with ArrayClient(api_daemon.api_url, "wrong") as api, pytest.raises(Unauthorized):
        api.list_luns()


def test_unreachable_url_is_daemon_unavailable() -> None:
    url = closed_port_url()
    with ArrayClient(url, "t", timeout=5) as api, pytest.raises(DaemonUnavailable, match=url):
        api.status()


def test_for_home_finds_the_daemon(api_daemon: Daemon) -> None:
    with ArrayClient.for_home(api_daemon.home) as api:
        assert api.url == api_daemon.api_url
        assert api.status().data_dir == str(api_daemon.home)


def test_for_home_without_a_daemon_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnavailable, match=f"lunseal --home {tmp_path} serve"):
        ArrayClient.for_home(tmp_path)


def test_for_home_with_a_stale_daemon_file_is_unavailable(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({"api_url": closed_port_url()}))
    (tmp_path / "api-token").write_text("token\n")
    with ArrayClient.for_home(tmp_path) as api, pytest.raises(DaemonUnavailable):
        api.status()


@pytest.mark.parametrize("suffix", ["?force=true", "#frag", "%3Fforce%3Dtrue", "/grow", "/../x"])
def test_a_name_never_reaches_another_lun(api: ArrayClient, suffix: str) -> None:
    target = api.create_lun("client-target", "1M")
    try:
        with pytest.raises(LunsealError) as deleting:
            api.delete_lun("client-target" + suffix)
        with pytest.raises(LunsealError) as showing:
            api.show_lun("client-target" + suffix)
        assert api.show_lun("client-target") == target
    finally:
        api.delete_lun("client-target", force=True)
    if "/" not in suffix:  # the server decodes %2F before routing: "/grow" is a 405
        assert isinstance(deleting.value, NotFound)
        assert isinstance(showing.value, NotFound)
