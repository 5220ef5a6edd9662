"""``lunseal token`` and ``lunseal audit`` with the real binary, and how the CLI
finds its token: never needed on the command line."""

from __future__ import annotations

import json
import stat
import time
from pathlib import Path

import pytest

from tests.support.cli import cli, ok, ok_json, one_line_error
from tests.support.cli import lunseal as run
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon


def make_token(daemon: Daemon, name: str, role: str, out: Path) -> None:
    ok(daemon, "token", "create", name, "--role", role, "--out", str(out))
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_create_prints_the_secret_once_and_list_never(cli_daemon: Daemon) -> None:
    created = ok_json(cli_daemon, "token", "create", "cli-once", "--role", "monitor")
    assert created["name"] == "cli-once"
    assert created["role"] == "monitor"
    secret = created["secret"]
    assert len(secret) > 40
    listed = ok(cli_daemon, "token", "list")
    assert "cli-once" in listed
    assert "monitor" in listed
    assert secret not in listed
    assert secret not in ok(cli_daemon, "--json", "token", "list")
    human = ok(cli_daemon, "token", "create", "cli-once-2", "--role", "operator")
    assert "shown only now" in human


def test_roles_through_token_file_and_environment(cli_daemon: Daemon, tmp_path: Path) -> None:
    make_token(cli_daemon, "cli-mon", "monitor", tmp_path / "mon")
    home = ["--home", str(cli_daemon.home)]
    # --token-file: reads are fine, LUN creation is refused (403 -> exit 7).
    listed = run(*home, "--token-file", str(tmp_path / "mon"), "--json", "lun", "list")
    assert listed.returncode == 0, listed.stderr
    refused = run(*home, "--token-file", str(tmp_path / "mon"), "lun", "create", "cli-x", "1M")
    assert "role monitor" in one_line_error(refused, 7)
    # The same through $LUNSEAL_TOKEN_FILE and $LUNSEAL_TOKEN, with --url.
    secret = (tmp_path / "mon").read_text().strip()
    for env in ({"LUNSEAL_TOKEN_FILE": str(tmp_path / "mon")}, {"LUNSEAL_TOKEN": secret}):
        url = ["--url", cli_daemon.api_url]
        assert run(*url, "--json", "status", env=env).returncode == 0
        refused = run(*url, "token", "list", env=env)
        assert "needs admin" in one_line_error(refused, 7)
    # --token-file wins over the data directory's admin token: nothing was created.
    assert "cli-x" not in ok(cli_daemon, "lun", "list")


def test_revoke(cli_daemon: Daemon, tmp_path: Path) -> None:
    make_token(cli_daemon, "cli-rev", "operator", tmp_path / "op")
    args = ["--home", str(cli_daemon.home), "--token-file", str(tmp_path / "op")]
    assert run(*args, "status").returncode == 0
    ok(cli_daemon, "token", "revoke", "cli-rev")
    assert "missing or wrong API token" in one_line_error(run(*args, "status"), 7)
    assert "no API token named" in one_line_error(cli(cli_daemon, "token", "revoke", "cli-rev"), 3)
    assert "cli-rev" not in ok(cli_daemon, "token", "list")


def test_bad_role_and_bad_token_file_are_one_line(cli_daemon: Daemon, tmp_path: Path) -> None:
    bad = cli(cli_daemon, "token", "create", "cli-bad", "--role", "root")
    assert "invalid role 'root'" in one_line_error(bad, 2)
    missing = cli(cli_daemon, "--token-file", str(tmp_path / "nope"), "status")
    assert "cannot read the API token" in one_line_error(missing, 2)
    (tmp_path / "empty").write_text("\n")
    empty = cli(cli_daemon, "--token-file", str(tmp_path / "empty"), "status")
    assert "is empty" in one_line_error(empty, 2)


def test_audit_shows_who_did_what(cli_daemon: Daemon, tmp_path: Path) -> None:
    make_token(cli_daemon, "cli-ops", "operator", tmp_path / "ops")
    ok(cli_daemon, "lun", "create", "cli-audited", "1M")
    args = ["--home", str(cli_daemon.home), "--token-file", str(tmp_path / "ops")]
    held = run(*args, "state", "enable", "cli-audited", "--hold", "nightly")
    assert held.returncode == 0, held.stderr
    assert run(*args, "lun", "delete", "cli-audited").returncode == 7
    events = ok_json(cli_daemon, "audit", "--since", "10m")
    seen = [(e["actor"], e["action"], e["target"], e["result"]) for e in events]
    assert ("admin", "POST /v1/luns", "/v1/luns", "201") in seen
    assert ("cli-ops", "POST /v1/luns/{name}/holds", "name=cli-audited", "201") in seen
    assert ("cli-ops", "DELETE /v1/luns/{name}", "name=cli-audited", "403") in seen
    table = ok(cli_daemon, "audit", "--since", "1h")
    assert "cli-ops" in table
    # An ISO time after everything: nothing; a bad one: one line.
    future = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    assert ok_json(cli_daemon, "audit", "--since", future) == []
    assert "invalid --since" in one_line_error(cli(cli_daemon, "audit", "--since", "soon"), 2)


def test_token_on_the_command_line_warns(cli_daemon: Daemon) -> None:
    result = run("--url", cli_daemon.api_url, "--token", cli_daemon.token, "--json", "status")
    assert result.returncode == 0, result.stderr
    assert "--token shows in ps" in result.stderr
    assert json.loads(result.stdout)["api_url"] == cli_daemon.api_url
