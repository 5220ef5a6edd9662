"""The small initiator against a real daemon, and the daemon's iSCSI portal
options (``lunseal serve --iscsi-*``)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.daemon import _is_loopback
from lunseal.errors import InvalidArgument
from lunseal.frontends.scsi.interface import GOOD
from lunseal.host.iscsi.initiator import Initiator, IscsiError, LoginRefused, parse_url
from lunseal.schema.iscsi import InitiatorAllow
from tests.support.cli import lunseal, one_line_error
from tests.support.daemon import Daemon

READ_CAPACITY_16 = bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + bytes(2)


def test_parse_url() -> None:
    url = parse_url("iscsi://127.0.0.1:3261/iqn.2026-12.io.lunseal:lunseal.x/3")
    assert (url.host, url.port, url.target, url.lun) == (
        "127.0.0.1",
        3261,
        "iqn.2026-12.io.lunseal:lunseal.x",
        3,
    )
    assert parse_url("iscsi://h/iqn.2026-12.a:b/0").port == 3260
    creds = parse_url("iscsi://user%sec%ret@h:1/iqn.2026-12.a:b/0")
    assert (creds.user, creds.secret) == ("user", "sec%ret")


@pytest.mark.parametrize(
    "bad",
    [
        "nbd://h/x/0",
        "iscsi://h/iqn.x",
        "iscsi://h/iqn.x/zero",
        "iscsi:///iqn.x/0",
        "iscsi://h:99999/iqn.x/0",
    ],
)
def test_parse_url_refuses(bad: str) -> None:
    with pytest.raises(InvalidArgument):
        parse_url(bad)


def test_connect_to_nothing_is_one_clear_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, never listening: refused
        with pytest.raises(IscsiError, match="cannot connect"):
            Initiator.connect("127.0.0.1", port, timeout=5)


def test_loopback_detection() -> None:
    assert _is_loopback("127.0.0.1")
    assert _is_loopback("::1")
    assert _is_loopback("localhost")
    assert not _is_loopback("0.0.0.0")
    assert not _is_loopback("192.0.2.7")


@pytest.fixture
def iscsi_daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path / "home").start()
    try:
        yield d
    finally:
        d.kill()


@pytest.mark.daemon
def test_daemon_publishes_its_portal_and_serves_the_demo_lun(iscsi_daemon: Daemon) -> None:
    info = json.loads((iscsi_daemon.home / "daemon.json").read_text())
    with iscsi_daemon.client() as api:
        array_id = api.status().array_id
    assert info["iscsi_host"] == "127.0.0.1"
    assert info["iscsi_portal"] == f"127.0.0.1:{info['iscsi_port']}"
    assert info["iscsi_target"] == f"iqn.2026-12.io.lunseal:lunseal.{array_id}"
    with Initiator.connect("127.0.0.1", iscsi_daemon.iscsi_port) as ini:
        ini.login(None)
        assert ini.discover() == [(info["iscsi_target"], f"{info['iscsi_portal']},1")]
    with Initiator.connect("127.0.0.1", iscsi_daemon.iscsi_port) as ini:
        ini.login(info["iscsi_target"])
        ini.command(0, bytes(6))  # power-on unit attention
        cap = ini.command(0, READ_CAPACITY_16, read_length=32)
        assert cap.status == GOOD
        assert int.from_bytes(cap.data[:8], "big") + 1 == (1 << 30) // 512
        assert ini.logout() == 0
    with (
        Initiator.connect("127.0.0.1", iscsi_daemon.iscsi_port) as ini,
        pytest.raises(LoginRefused),
    ):
        ini.login("iqn.2026-12.io.lunseal:lunseal.not-this-one")


@pytest.mark.daemon
def test_target_name_option_and_no_iscsi(tmp_path: Path) -> None:
    named = Daemon(
        tmp_path / "a", ["--iscsi-target-name", "iqn.2026-12.com.example:array7"]
    ).start()
    try:
        assert named.iscsi_target == "iqn.2026-12.com.example:array7"
    finally:
        named.kill()
    off = Daemon(tmp_path / "b", ["--no-iscsi"]).start()
    try:
        assert off.info["iscsi_port"] is None
        assert off.info["iscsi_target"] is None
    finally:
        off.kill()


@pytest.mark.daemon
def test_a_busy_iscsi_port_is_one_line_exit_6_and_creates_nothing(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        home = tmp_path / "new-home"
        result = lunseal(
            "serve",
            "--home",
            str(home),
            "--nbd-port",
            "0",
            "--api-port",
            "0",
            "--iscsi-port",
            str(port),
            timeout=60,
        )
        line = one_line_error(result, 6)
    assert f"cannot listen for iSCSI on 127.0.0.1:{port}: the port is in use" in line
    assert "--iscsi-port" in line
    assert not home.exists()


@pytest.mark.daemon
def test_a_bad_target_name_is_refused(tmp_path: Path) -> None:
    result = lunseal(
        "serve",
        "--home",
        str(tmp_path / "h"),
        "--nbd-port",
        "0",
        "--api-port",
        "0",
        "--iscsi-port",
        "0",
        "--iscsi-target-name",
        "Not An IQN",
        timeout=60,
    )
    assert result.returncode == 2
    assert "--iscsi-target-name" in result.stderr
    assert not (tmp_path / "h").exists()


@pytest.mark.daemon
def test_the_first_acl_entry_ends_other_initiators_sessions(iscsi_daemon: Daemon) -> None:
    """Sessions that logged in while anyone could keep no access the ACL now denies."""
    with Initiator.connect(
        "127.0.0.1", iscsi_daemon.iscsi_port, name="iqn.2026-12.test:early"
    ) as ini:
        ini.login(iscsi_daemon.iscsi_target)
        ini.command(0, bytes(6))
        assert ini.command(0, bytes(6)).status == GOOD
        with iscsi_daemon.client() as api:
            api.allow_initiator("iqn.2026-12.test:other", InitiatorAllow())
        with pytest.raises(IscsiError):
            ini.command(0, bytes(6))
    with (
        Initiator.connect(
            "127.0.0.1", iscsi_daemon.iscsi_port, name="iqn.2026-12.test:early"
        ) as ini,
        pytest.raises(LoginRefused),
    ):
        ini.login(iscsi_daemon.iscsi_target)
