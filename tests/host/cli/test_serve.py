"""``lunseal serve`` start-up errors: one line, a documented exit code, nothing created."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.cli import lunseal, one_line_error

pytestmark = pytest.mark.daemon


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process (this test) listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield int(sock.getsockname()[1])


@pytest.mark.parametrize(
    ("option", "other", "what"),
    [("--nbd-port", "--api-port", "NBD"), ("--api-port", "--nbd-port", "the API")],
)
def test_a_busy_port_is_one_line_exit_6_and_creates_nothing(
    tmp_path: Path, busy_port: int, option: str, other: str, what: str
) -> None:
    home = tmp_path / "new-home"
    result = lunseal("serve", "--home", str(home), option, str(busy_port), other, "0", timeout=60)
    line = one_line_error(result, 6)
    assert f"cannot listen for {what} on 127.0.0.1:{busy_port}: the port is in use" in line
    assert option in line
    assert not home.exists()


def test_a_busy_port_leaves_an_existing_home_untouched(tmp_path: Path, busy_port: int) -> None:
    home = tmp_path / "home"
    home.mkdir()
    result = lunseal("--home", str(home), "serve", "--nbd-port", str(busy_port), timeout=60)
    one_line_error(result, 6)
    assert list(home.iterdir()) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--nbd-listen", "192.0.2.1"], "cannot listen for NBD on 192.0.2.1:0:"),
        (["--api-listen", "no-such-host.invalid"], "cannot listen for the API on no-such-host"),
    ],
)
def test_an_unusable_address_is_one_line_exit_2(
    tmp_path: Path, args: list[str], message: str
) -> None:
    home = tmp_path / "home"
    result = lunseal(
        "serve", "--home", str(home), "--nbd-port", "0", "--api-port", "0", *args, timeout=60
    )
    assert message in one_line_error(result, 2)
    assert not home.exists()
