"""``lunseal iscsi ...``: the real binary against a real daemon.  Secrets come from
files or the environment, never from the command line, and are never printed."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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
