"""The shipped systemd unit and example configuration: ``systemd-analyze verify``
passes without a single warning, and the unit says what the docs promise."""

from __future__ import annotations

import configparser
import subprocess
import sys
from pathlib import Path

import pytest

from lunseal.config import load
from lunseal.host.cli.serve import serve
from tests.support.tools import require_tools

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "packaging" / "lunseal.service"
EXAMPLE = ROOT / "packaging" / "lunseal.toml"
INSTALLED = "/usr/local/bin/lunseal"


def verify(text: str, tmp_path: Path) -> str:
    """Everything ``systemd-analyze verify`` says about a unit with this text."""
    require_tools("systemd-analyze")
    # verify insists that ExecStart exists; point it at this checkout's lunseal.
    here = str(Path(sys.executable).with_name("lunseal"))
    unit = tmp_path / "lunseal.service"
    unit.write_text(text.replace(INSTALLED, here))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return f"{result.returncode}\n{result.stdout}{result.stderr}".strip()


def test_the_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    assert verify(UNIT.read_text(), tmp_path) == "0"


@pytest.mark.parametrize(
    ("good", "bad"),
    [
        ("ProtectSystem=strict", "ProtectSystem=bogus"),
        ("PrivateTmp=yes", "PrivateTmpp=yes"),
        (f"ExecStart={INSTALLED}", "ExecStart=/nonexistent/lunseal"),
    ],
)
def test_a_broken_unit_is_caught(tmp_path: Path, good: str, bad: str) -> None:
    text = UNIT.read_text()
    assert good in text
    assert verify(text.replace(good, bad), tmp_path) != "0"


def test_the_unit_runs_serve_with_the_config_and_sandbox() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    service = parser["Service"]
    assert service["ExecStart"] == f"{INSTALLED} serve --config /etc/lunseal/lunseal.toml"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["StateDirectory"] == "lunseal"
    assert service["ReadWritePaths"] == "/var/lib/lunseal"
    assert service["ProtectSystem"] == "strict"
    for flag in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert service[flag] == "yes"
    assert service["RestrictAddressFamilies"] == "AF_UNIX AF_INET AF_INET6"


def test_the_example_configuration_is_valid() -> None:
    settings = load(EXAMPLE, serve)
    assert settings.home == Path("/var/lib/lunseal")
    assert settings.serve["nbd_listen"] == "127.0.0.1"
    assert settings.serve["allowed_backing_dirs"] == []
