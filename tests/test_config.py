"""The configuration file: checked as a whole, one-line errors, round trip, and
``lunseal serve --config`` with flags winning over the file."""

from __future__ import annotations

import enum
import json
import tomllib
from pathlib import Path

import pytest
import typer

from lunseal.config import ConfigError, dump, load
from lunseal.host.cli.serve import serve
from tests.support.cli import lunseal, one_line_error
from tests.support.daemon import Daemon


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "lunseal.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[serve]\nnbd_port = 'x'\n", "serve.nbd_port must be an integer, not a string"),
        ("[serve]\nnbd_port = 70000\n", "serve.nbd_port must be between 0 and 65535"),
        ("[serve]\nnbd-port = 1\n", "unknown key serve.nbd-port (did you mean 'nbd_port'?)"),
        ("[serve]\nsurprise = 1\n", "unknown key serve.surprise"),
        ("[serf]\nnbd_port = 1\n", "unknown table or key 'serf'"),
        ("[serve]\niscsi = 1\n", "serve.iscsi must be true or false, not an integer"),
        ("[serve]\nclean_after = true\n", "serve.clean_after must be a number, not a boolean"),
        ("[serve]\nallowed_backing_dirs = '/srv'\n", "serve.allowed_backing_dirs must be a list"),
        ("[serve]\nallowed_backing_dirs = [1]\n", "allowed_backing_dirs must be a string"),
        ("[serve\n", "not valid TOML"),
        ("serve = 3\n", "'serve' must be a table"),
    ],
)
def test_a_bad_file_is_one_line_naming_file_and_key(
    tmp_path: Path, text: str, message: str
) -> None:
    path = write(tmp_path, text)
    line = one_line_error(lunseal("config", "check", str(path)), 2)
    assert str(path) in line
    assert message in line


def test_a_missing_or_huge_file_is_one_line(tmp_path: Path) -> None:
    line = one_line_error(lunseal("config", "check", str(tmp_path / "nope.toml")), 2)
    assert "nope.toml: cannot read" in line
    huge = write(tmp_path, "# " + "x" * (2 << 20) + "\n")
    assert "not a configuration file" in one_line_error(lunseal("config", "check", str(huge)), 2)


def test_check_json_shows_the_effective_settings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "[serve]\nnbd_port = 12000\nclean_after = 3\nhome = '/var/lib/x'\n"
        "allowed_backing_dirs = ['/srv/disks']\n",
    )
    result = lunseal("config", "check", str(path), "--json")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)
    assert settings["nbd_port"] == 12000
    assert settings["clean_after"] == 3.0
    assert settings["api_port"] == 10810  # a default
    assert settings["home"] == "/var/lib/x"
    assert settings["allowed_backing_dirs"] == ["/srv/disks"]
    plain = lunseal("config", "check", str(path))
    assert plain.returncode == 0
    assert "ok" in plain.stdout


def test_the_effective_settings_round_trip(tmp_path: Path) -> None:
    path = write(tmp_path, "[serve]\nnbd_listen = '::1'\niscsi = false\nmax_connections = 9\n")
    first = load(path, serve).effective(serve)
    again = write(tmp_path, dump(first))
    second = load(again, serve).effective(serve)
    assert second == first
    assert tomllib.loads(again.read_text())["serve"]["max_connections"] == 9


def test_the_shown_default_file_is_valid_and_uncomments_cleanly(tmp_path: Path) -> None:
    result = lunseal("config", "show")
    assert result.returncode == 0
    assert "[serve]" in result.stdout
    uncommented = "\n".join(
        line[2:] if line.startswith("# ") and " = " in line and "..." not in line else line
        for line in result.stdout.splitlines()
    )
    path = write(tmp_path, uncommented)
    settings = load(path, serve)
    assert settings.serve["nbd_port"] == 10809
    assert settings.home == Path("/var/lib/lunseal")


def test_load_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"unknown key serve\.x"):
        load(write(tmp_path, "[serve]\nx = 1\n"), serve)


@pytest.mark.daemon
def test_serve_takes_the_file_and_flags_win(tmp_path: Path) -> None:
    # The file turns iSCSI and the demo LUN off and asks for API port 1; the
    # test daemon's --api-port 0 flag must win over the file.
    home = tmp_path / "from-file"
    path = write(
        tmp_path,
        f"[serve]\niscsi = false\ndemo = false\napi_port = 1\nhome = '{home}'\n",
    )
    daemon = Daemon(tmp_path / "flag-home", extra_args=["--config", str(path)]).start()
    try:
        assert daemon.info["iscsi_portal"] is None
        assert not daemon.api_url.endswith(":1")
        with daemon.client() as api:
            assert api.list_luns() == []
        # --home (the test daemon passes it) wins over the file's home too.
        assert (tmp_path / "flag-home" / "catalog.sqlite").exists()
        assert not home.exists()
    finally:
        assert daemon.stop() == 0


@pytest.mark.daemon
def test_serve_refuses_a_bad_file_before_creating_anything(tmp_path: Path) -> None:
    path = write(tmp_path, "[serve]\nnbd_port = 'ten'\n")
    home = tmp_path / "home"
    result = lunseal("--home", str(home), "serve", "--config", str(path), timeout=60)
    assert "serve.nbd_port must be an integer" in one_line_error(result, 2)
    assert not home.exists()


class Mode(enum.StrEnum):
    OFF = "off"
    REQUIRE = "require"


def command(mode: Mode = typer.Option(Mode.OFF)) -> None:
    """serve has no enum option yet (TLS modes will be one): a stand-in command."""


def test_an_enum_option_takes_only_its_values(tmp_path: Path) -> None:
    ok = load(write(tmp_path, "[serve]\nmode = 'require'\n"), command)
    assert ok.serve["mode"] == "require"
    assert load(write(tmp_path, "[serve]\n"), command).effective(command)["mode"] == "off"
    with pytest.raises(ConfigError, match=r"serve\.mode must be one of off, require, not 'on'"):
        load(write(tmp_path, "[serve]\nmode = 'on'\n"), command)
