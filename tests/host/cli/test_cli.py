"""The real ``lunseal`` binary against a real daemon: output for people and for scripts."""

from __future__ import annotations

import json
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from lunseal import __version__
from tests.support.cli import cli, ok, ok_json
from tests.support.cli import lunseal as run
from tests.support.cli import one_line_error as assert_one_line_error
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20


def names(daemon: Daemon) -> list[str]:
    with daemon.client() as api:
        return [lun.name for lun in api.list_luns()]


def make_lun(daemon: Daemon, name: str, size: str = "1M", *, read_only: bool = False) -> None:
    """Set-up through the API: these tests are about the command under test."""
    with daemon.client() as api:
        api.create_lun(name, size, read_only=read_only)


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


# -- LUN commands, for people ---------------------------------------------------------------


def test_create_prints_the_lun_and_whole_uris(cli_daemon: Daemon) -> None:
    lines = ok(cli_daemon, "lun", "create", "cli-create", "1M", "--number", "30").splitlines()
    assert lines[0] == "created LUN cli-create (number 30, 1M)"
    uris = {line.strip() for line in lines[1:]}
    assert f"nbd+unix:///cli-create?socket={cli_daemon.socket}" in uris
    assert f"nbd://{cli_daemon.tcp}/cli-create" in uris


def test_list_shows_a_row_per_lun(cli_daemon: Daemon) -> None:
    make_lun(cli_daemon, "cli-list", "2M", read_only=True)
    out = ok(cli_daemon, "lun", "list")
    assert "NAME" in out.splitlines()[0]
    row = next(line for line in out.splitlines() if " cli-list " in line)
    assert "2M" in row
    assert " ro " in row


def test_show_prints_details(cli_daemon: Daemon) -> None:
    make_lun(cli_daemon, "cli-show", "3M")
    fields: dict[str, list[str]] = {}
    for line in ok(cli_daemon, "lun", "show", "cli-show").splitlines():
        key, _, value = line.partition("  ")
        fields.setdefault(key.strip(), []).append(value.strip())
    assert fields["name"] == ["cli-show"]
    assert fields["size"] == ["3M (3145728 bytes)"]
    assert fields["mode"] == ["read-write"]
    assert f"nbd+unix:///cli-show?socket={cli_daemon.socket}" in fields["nbd"]
    assert fields["backend"][0].startswith(f"file {cli_daemon.home}/luns/")


def test_grow(cli_daemon: Daemon) -> None:
    make_lun(cli_daemon, "cli-grow")
    assert ok(cli_daemon, "lun", "grow", "cli-grow", "4M") == "LUN cli-grow is now 4M\n"


def test_set_read_only_and_back(cli_daemon: Daemon) -> None:
    make_lun(cli_daemon, "cli-set")
    assert ok(cli_daemon, "lun", "set", "cli-set", "--read-only") == "LUN cli-set is read-only\n"
    assert ok(cli_daemon, "lun", "set", "cli-set", "--read-write") == "LUN cli-set is read-write\n"


def test_delete(cli_daemon: Daemon) -> None:
    make_lun(cli_daemon, "cli-delete")
    assert ok(cli_daemon, "lun", "delete", "cli-delete") == "deleted LUN cli-delete\n"
    assert "cli-delete" not in names(cli_daemon)


def test_status_for_people(cli_daemon: Daemon) -> None:
    out = ok(cli_daemon, "status")
    assert f"API              {cli_daemon.api_url}" in out.splitlines()
    assert f"NBD unix         {cli_daemon.socket}" in out.splitlines()
    assert "last shutdown    clean" in out.splitlines()


# -- LUN commands, for scripts ----------------------------------------------------------------


def test_json_lifecycle(cli_daemon: Daemon) -> None:
    created = ok_json(cli_daemon, "lun", "create", "cli-json", "1M")
    assert (created["name"], created["size"], created["read_only"]) == ("cli-json", MiB, False)
    assert ok_json(cli_daemon, "lun", "show", "cli-json") == created
    assert created in ok_json(cli_daemon, "lun", "list")
    assert ok_json(cli_daemon, "lun", "grow", "cli-json", "2M")["size"] == 2 * MiB
    assert ok_json(cli_daemon, "lun", "set", "cli-json", "--read-only")["read_only"] is True
    assert ok_json(cli_daemon, "lun", "delete", "cli-json") is None


def test_status_json(cli_daemon: Daemon) -> None:
    status = ok_json(cli_daemon, "status")
    assert status["api_url"] == cli_daemon.api_url
    assert status["nbd"] == {"tcp": cli_daemon.tcp, "unix": cli_daemon.socket}
    assert status["data_dir"] == str(cli_daemon.home)
    assert status["luns"] == len(names(cli_daemon))
    assert status["version"] == __version__


# -- errors ------------------------------------------------------------------------------------

#: The CLI maps error classes to exit codes; the API tests cover every validation rule.
ERRORS: list[tuple[list[str], int, str]] = [
    (["lun", "create", "../x", "1M"], 2, "invalid LUN name '../x'"),
    (["lun", "create", "cli-bad", "12Q"], 2, "invalid size '12Q'"),
    (["lun", "create", "cli-bad", "--", "-1"], 2, "invalid size '-1'"),
    (["lun", "create", "cli-bad", "1000"], 2, "multiple of 512"),
    (["lun", "create", "cli-bad"], 2, "size is required"),
    (["lun", "grow", "demo", "1M"], 2, "LUNs can only grow"),
    (["lun", "show", "nope"], 3, "no LUN named 'nope'"),
    (["lun", "set", "nope", "--read-only"], 3, "no LUN named 'nope'"),
    (["lun", "delete", "demo?force=true"], 3, "no LUN named 'demo?force=true'"),
    (["lun", "create", "demo", "1M"], 4, "already exists"),
    (["lun", "create", "cli-bad", "1M", "--number", "0"], 4, "number 0 is already in use"),
]


ERROR_IDS = [" ".join(args) for args, _, _ in ERRORS]


@dataclass
class ErrorRuns:
    results: dict[str, subprocess.CompletedProcess[str]]
    names_before: list[str]
    names_after: list[str]


@pytest.fixture(scope="module")
def error_runs(cli_daemon: Daemon) -> ErrorRuns:
    """Run every failing command at once: none of them may change anything."""
    before = names(cli_daemon)
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {
            case: pool.submit(cli, cli_daemon, *args)
            for case, (args, _, _) in zip(ERROR_IDS, ERRORS, strict=True)
        }
        results = {case: future.result() for case, future in futures.items()}
    return ErrorRuns(results, before, names(cli_daemon))


@pytest.mark.parametrize(("args", "code", "message"), ERRORS, ids=ERROR_IDS)
def test_errors_print_one_line_and_exit_with_the_class_code(
    error_runs: ErrorRuns, args: list[str], code: int, message: str
) -> None:
    line = assert_one_line_error(error_runs.results[" ".join(args)], code)
    assert message in line


def test_failed_commands_change_nothing(error_runs: ErrorRuns) -> None:
    assert error_runs.names_after == error_runs.names_before


def test_errors_stay_one_line_with_json(cli_daemon: Daemon) -> None:
    result = cli(cli_daemon, "--json", "lun", "show", "nope")
    assert "no LUN named 'nope'" in assert_one_line_error(result, 3)


USAGE_ERRORS: list[tuple[list[str], str]] = [
    ([], "Missing command"),
    (["--bogus"], "No such option: --bogus"),
    (["lun", "create", "x", "1M", "--number", "abc"], "Invalid value for '--number'"),
]


@pytest.mark.parametrize(
    ("args", "message"), USAGE_ERRORS, ids=[" ".join(args) or "none" for args, _ in USAGE_ERRORS]
)
def test_usage_errors_exit_2_without_a_traceback(
    tmp_path: Path, args: list[str], message: str
) -> None:
    result = run("--home", str(tmp_path), *args)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_bare_group_shows_its_help(tmp_path: Path) -> None:
    result = run("--home", str(tmp_path), "lun")
    assert result.returncode == 2
    assert "create" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


# -- finding the array -------------------------------------------------------------------------


def test_no_daemon_for_the_home_is_exit_5(tmp_path: Path) -> None:
    line = assert_one_line_error(run("--home", str(tmp_path), "lun", "list"), 5)
    assert f"no lunseal daemon is running for {tmp_path}" in line
    assert f"lunseal --home {tmp_path} serve" in line


def test_a_dead_daemon_is_exit_5(tmp_path: Path) -> None:
    (tmp_path / "daemon.json").write_text(json.dumps({"api_url": closed_port_url()}))
    (tmp_path / "api-token").write_text("token\n")
    line = assert_one_line_error(run("--home", str(tmp_path), "status"), 5)
    assert "cannot reach the lunseal API" in line


def test_home_from_the_environment(cli_daemon: Daemon) -> None:
    result = run("--json", "status", env={"LUNSEAL_HOME": str(cli_daemon.home)})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["api_url"] == cli_daemon.api_url


def test_url_and_token(cli_daemon: Daemon, tmp_path: Path) -> None:
    # --token still works, with a warning: ps shows a command line to every local user.
    args = ["--home", str(tmp_path), "--url", cli_daemon.api_url, "--token", cli_daemon.token]
    result = run(*args, "--json", "lun", "list")
    assert result.returncode == 0, result.stderr
    assert "demo" in [lun["name"] for lun in json.loads(result.stdout)]
    assert "warning: --token shows in ps" in result.stderr


def test_url_and_token_from_the_environment(cli_daemon: Daemon) -> None:
    env = {"LUNSEAL_URL": cli_daemon.api_url, "LUNSEAL_TOKEN": cli_daemon.token}
    result = run("--json", "lun", "show", "demo", env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["name"] == "demo"


GLOBALS_AFTER: list[tuple[str, ...]] = [
    ("status", "--home", "{home}", "--json"),
    ("lun", "list", "--home={home}", "--json"),
    ("lun", "show", "demo", "--json", "--url", "{url}", "--token-file", "{token_file}"),
    ("mirror", "status", "--json", "--home", "{home}"),
    ("state", "holds", "demo", "--url={url}", "--token-file={token_file}", "--json"),
]


@pytest.mark.parametrize("args", GLOBALS_AFTER, ids=[" ".join(a[:2]) for a in GLOBALS_AFTER])
def test_global_options_after_the_subcommand(
    cli_daemon: Daemon, tmp_path: Path, args: tuple[str, ...]
) -> None:
    values = {
        "home": str(cli_daemon.home),
        "url": cli_daemon.api_url,
        "token_file": str(cli_daemon.home / "api-token"),
    }
    # A wrong home in the environment: the option given after the subcommand wins.
    result = run(*(a.format(**values) for a in args), env={"LUNSEAL_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    json.loads(result.stdout)  # --json took effect


def test_the_last_home_given_wins(cli_daemon: Daemon, tmp_path: Path) -> None:
    result = run("--home", str(tmp_path), "status", "--json", "--home", str(cli_daemon.home))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["api_url"] == cli_daemon.api_url


def test_a_global_option_without_its_value_is_one_line(tmp_path: Path) -> None:
    assert "--home needs a value" in assert_one_line_error(run("lun", "list", "--home"), 2)


def test_options_after_double_dash_stay_arguments(cli_daemon: Daemon) -> None:
    # After "--" even a global option's name is an argument: here, a LUN name.
    result = cli(cli_daemon, "lun", "show", "--", "--json")
    assert "no LUN named '--json'" in assert_one_line_error(result, 3)


def test_wrong_token_is_exit_7(cli_daemon: Daemon) -> None:
    env = {"LUNSEAL_TOKEN": "wrong"}
    result = run("--url", cli_daemon.api_url, "lun", "list", env=env)
    assert "missing or wrong API token" in assert_one_line_error(result, 7)


def test_url_without_token_is_exit_2(cli_daemon: Daemon) -> None:
    result = run("--url", cli_daemon.api_url, "lun", "list")
    assert "--url needs --token" in assert_one_line_error(result, 2)


def test_version() -> None:
    result = run("--version")
    assert (result.returncode, result.stdout) == (0, f"lunseal {__version__}\n")


def test_an_empty_array_says_how_to_create_a_lun(tmp_path: Path) -> None:
    empty = Daemon(tmp_path / "home", extra_args=["--no-demo"]).start()
    try:
        assert (
            ok(empty, "lun", "list") == "no LUNs (create one with: lunseal lun create NAME SIZE)\n"
        )
        assert ok_json(empty, "lun", "list") == []
    finally:
        empty.stop()
