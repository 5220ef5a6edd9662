"""``lunseal iscsi ...``: the real binary against a real daemon.  Secrets come from
files or the environment, never from the command line, and are never printed."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lunseal.host.iscsi.initiator import Initiator
from tests.interop.helpers import lun_io as qemu_io
from tests.support.cli import cli, lunseal, ok, one_line_error
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

SECRET = "cli-secret-0123"
MUTUAL = "cli-mutual-0123"
_names = itertools.count()


@pytest.fixture
def host(cli_daemon: Daemon) -> Iterator[str]:
    name = f"iqn.2026-12.test.cli:h{next(_names)}"
    yield name
    cli(cli_daemon, "iscsi", "deny", name)


@pytest.fixture
def lun(cli_daemon: Daemon) -> str:
    name = f"icl{next(_names)}"
    with cli_daemon.client() as api:
        api.create_lun(name, "1M")
    return name


def ok_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(ok(daemon, *args, "--json"))


def secret_file(tmp_path: Path, name: str, secret: str) -> str:
    path = tmp_path / name
    path.write_text(secret + "\n")  # as an editor leaves it: the newline is not the secret
    return str(path)


def test_allow_show_deny(cli_daemon: Daemon, host: str, lun: str, tmp_path: Path) -> None:
    assert "any initiator may log in" in ok(cli_daemon, "iscsi", "show")
    chap = secret_file(tmp_path, "chap", SECRET)
    out = ok(
        cli_daemon,
        *("iscsi", "allow", host, "--lun", f"{lun}:ro"),
        *("--chap-user", "u1", "--chap-secret-file", chap),
    )
    assert f"initiator {host}: LUNs {lun}:ro; CHAP u1; mutual -" in out
    shown = ok(cli_daemon, "iscsi", "show")
    assert host in shown
    assert SECRET not in shown
    info = ok_json(cli_daemon, "iscsi", "show")
    assert info["open"] is False
    (mine,) = [i for i in info["initiators"] if i["name"] == host]
    assert mine["luns"] == [{"lun": lun, "number": mine["luns"][0]["number"], "access": "ro"}]
    assert mine["chap_user"] == "u1"
    assert "removed" in ok(cli_daemon, "iscsi", "deny", host)


def test_lun_access_changes(cli_daemon: Daemon, host: str, lun: str) -> None:
    ok(cli_daemon, "iscsi", "allow", host, "--lun", lun)
    assert ok_json(cli_daemon, "iscsi", "lun", host, lun, "ro")["luns"][0]["access"] == "ro"
    assert ok_json(cli_daemon, "iscsi", "lun", host, lun, "none")["luns"] == []
    line = one_line_error(cli(cli_daemon, "iscsi", "lun", host, lun, "sometimes"), 2)
    assert "use ro, rw or none" in line


def test_chap_from_the_environment_and_mutual(
    cli_daemon: Daemon, host: str, tmp_path: Path
) -> None:
    ok(cli_daemon, "iscsi", "allow", host)
    mutual = secret_file(tmp_path, "mutual", MUTUAL)
    result = lunseal(
        *("--home", str(cli_daemon.home), "--json", "iscsi", "chap", host, "--user", "u2"),
        *("--mutual-user", "tgt", "--mutual-secret-file", mutual),
        env={"LUNSEAL_CHAP_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert (info["chap_user"], info["mutual_user"]) == ("u2", "tgt")
    assert SECRET not in result.stdout
    info = ok_json(cli_daemon, "iscsi", "chap", host, "--clear")
    assert info["chap_user"] is None


def test_errors_are_one_line(cli_daemon: Daemon, host: str, tmp_path: Path) -> None:
    short = secret_file(tmp_path, "short", "tooshort")
    line = one_line_error(
        cli(cli_daemon, "iscsi", "allow", host, "--chap-user", "u", "--chap-secret-file", short),
        2,
    )
    assert "at least 12" in line
    line = one_line_error(cli(cli_daemon, "iscsi", "allow", host, "--chap-user", "u"), 2)
    assert "LUNSEAL_CHAP_SECRET" in line
    line = one_line_error(cli(cli_daemon, "iscsi", "allow", "not-a-name"), 2)
    assert "invalid iSCSI name" in line
    line = one_line_error(cli(cli_daemon, "iscsi", "deny", host), 3)
    assert "no iSCSI initiator" in line
    line = one_line_error(cli(cli_daemon, "iscsi", "allow", host, "--lun", "x:rwx"), 2)
    assert "NAME:ro" in line
    missing = str(tmp_path / "absent")
    line = one_line_error(
        cli(cli_daemon, "iscsi", "allow", host, "--chap-user", "u", "--chap-secret-file", missing),
        2,
    )
    assert "cannot read the CHAP secret" in line
    line = one_line_error(cli(cli_daemon, "iscsi", "chap", host), 2)
    assert "--clear" in line


# -- lunseal state ... iscsi://: the in-band state commands through lunseal's initiator --------


@pytest.fixture
def numbered(cli_daemon: Daemon) -> tuple[str, str]:
    """A fresh LUN: its name and its iscsi:// URL."""
    name = f"isl{next(_names)}"
    with cli_daemon.client() as api:
        number = api.create_lun(name, "8M").number
    return name, f"iscsi://127.0.0.1:{cli_daemon.iscsi_port}/{cli_daemon.iscsi_target}/{number}"


def test_state_in_band_matches_the_api_and_sees_nbd_writes(
    cli_daemon: Daemon, numbered: tuple[str, str]
) -> None:
    name, url = numbered
    line = one_line_error(cli(cli_daemon, "state", "get", url), 4)
    assert "tracking is off" in line
    token = ok(cli_daemon, "state", "enable", url, "--hold", "backup").strip()
    assert token.startswith("lst1.")
    assert ok(cli_daemon, "state", "get", name).strip() == token  # the API's token
    assert ok(cli_daemon, "state", "get", url).strip() == token
    got = ok_json(cli_daemon, "state", "get", url)
    assert (got["url"], got["token"], got["holds"], got["tracking"]) == (
        url,
        token,
        ["backup"],
        True,
    )
    holds = ok_json(cli_daemon, "state", "holds", name)
    assert [(h["name"], h["token"]) for h in holds] == [("backup", token)]
    assert ok(cli_daemon, "state", "check", url, token).startswith("intact:")

    qemu_io(cli_daemon, name, "write -P 0x5a 0 64k")  # over NBD
    result = cli(cli_daemon, "state", "check", url, token)
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("changed: ")
    assert "written" in result.stdout
    now = ok(cli_daemon, "state", "get", url).strip()
    assert now != token
    assert now == ok(cli_daemon, "state", "get", name).strip()
    answer = ok_json(cli_daemon, "state", "check", name, now)  # and the API agrees
    assert answer["result"] == "intact"

    assert "tracking is off" in ok(cli_daemon, "state", "disable", url, "--hold", "backup")
    assert ok_json(cli_daemon, "state", "holds", name) == []


def test_state_in_band_errors_exit_like_the_api(
    cli_daemon: Daemon, numbered: tuple[str, str]
) -> None:
    name, url = numbered
    ok(cli_daemon, "state", "enable", url, "--hold", "h", "--mode", "flag", "--track-changes=1M")
    holds = ok_json(cli_daemon, "state", "holds", name)
    assert [(h["name"], h["granularity"]) for h in holds] == [("h", 1 << 20)]
    assert "already has a hold" in one_line_error(
        cli(cli_daemon, "state", "enable", url, "--hold", "h"), 4
    )
    assert "no hold named" in one_line_error(
        cli(cli_daemon, "state", "disable", url, "--hold", "x"), 3
    )
    assert "not a lunseal state token" in one_line_error(
        cli(cli_daemon, "state", "check", url, "garbage"), 2
    )
    bad = url.rsplit("/", 1)[0] + "/4000"
    line = one_line_error(cli(cli_daemon, "state", "get", bad), 3)
    assert "no LUN 4000 at" in line
    ok(cli_daemon, "state", "disable", url, "--hold", "h")


def test_state_in_band_with_chap(
    cli_daemon: Daemon, numbered: tuple[str, str], tmp_path: Path
) -> None:
    _name, url = numbered
    host = f"iqn.2026-12.test.cli:chap{next(_names)}"
    chap = secret_file(tmp_path, "chap", SECRET)
    mutual = secret_file(tmp_path, "mutual", MUTUAL)
    ok(
        cli_daemon,
        "iscsi",
        "allow",
        host,
        "--chap-user",
        "bk",
        "--chap-secret-file",
        chap,
        "--mutual-user",
        "array",
        "--mutual-secret-file",
        mutual,
    )
    try:
        login = ("--initiator", host, "--chap-user", "bk")
        token = ok(
            cli_daemon,
            "state",
            "enable",
            url,
            *login,
            "--chap-secret-file",
            chap,
            "--mutual-user",
            "array",
            "--mutual-secret-file",
            mutual,
        ).strip()
        env = {
            "LUNSEAL_INITIATOR_NAME": host,
            "LUNSEAL_CHAP_USER": "bk",
            "LUNSEAL_CHAP_SECRET": SECRET,
        }
        result = lunseal("--home", str(cli_daemon.home), "state", "get", url, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == token
        wrong = secret_file(tmp_path, "wrong", "not-the-right-one")
        result = cli(cli_daemon, "state", "get", url, *login, "--chap-secret-file", wrong)
        assert "authentication failed" in one_line_error(result, 1)
        # Not allowed at all: the ACL is closed to every other initiator.
        result = cli(cli_daemon, "state", "get", url)
        assert "initiator not allowed" in one_line_error(result, 1)
    finally:
        ok(cli_daemon, "iscsi", "deny", host)
    ok(cli_daemon, "state", "disable", url)


def test_a_write_over_iscsi_changes_the_token_read_in_band(
    cli_daemon: Daemon, numbered: tuple[str, str]
) -> None:
    name, url = numbered
    token = ok(cli_daemon, "state", "enable", url).strip()
    number = int(url.rsplit("/", 1)[1])
    with Initiator.connect("127.0.0.1", cli_daemon.iscsi_port) as ini:
        ini.login(cli_daemon.iscsi_target)
        write10 = bytes([0x2A, 0, 0, 0, 0, 8, 0, 0, 1, 0])
        for _ in range(4):  # past the new session's unit attention
            r = ini.command(number, write10, data_out=b"\x11" * 512)
            if r.status == 0:
                break
        assert r.status == 0, r.sense.hex()
    result = cli(cli_daemon, "state", "check", url, token)
    assert result.returncode == 1, result.stderr
    assert "written" in result.stdout
    assert ok(cli_daemon, "state", "get", url) == ok(cli_daemon, "state", "get", name)
    ok(cli_daemon, "state", "disable", url)
