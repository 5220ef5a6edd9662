"""``lunseal state ...``: the real binary against a real daemon, for people and scripts."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from tests.interop.helpers import lun_io as qemu_io
from tests.support.cli import cli as run
from tests.support.cli import ok, one_line_error
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

KiB = 1 << 10
MiB = 1 << 20

_names = itertools.count()


def ok_json(daemon: Daemon, *args: str) -> Any:
    """``--json`` last on the line: the CLI accepts it anywhere."""
    return json.loads(ok(daemon, *args, "--json"))


@pytest.fixture
def lun(cli_daemon: Daemon) -> str:
    name = f"cst{next(_names)}"
    with cli_daemon.client() as api:
        api.create_lun(name, "8M")
    return name


def table_rows(out: str) -> list[list[str]]:
    """The cells of a rich table: header first, then one list per row, with cells that
    the console folded over several lines joined again."""
    found: list[list[str]] = []
    for line in out.splitlines():
        sep = "┃" if "┃" in line else "│"
        if not line.strip() or (sep not in line and set(line.strip()) <= set("━─╇┿┼ ")):
            continue
        parts = [part.strip() for part in line.split(sep)]
        if parts[0] or not found:
            found.append(parts)
        else:
            found[-1] = [a + b for a, b in zip(found[-1], parts, strict=True)]
    return found


# -- enable, get, check, disable: the seed's commands as written ------------------------------


def test_enable_get_check_disable(cli_daemon: Daemon, lun: str) -> None:
    out = ok(cli_daemon, "state", "enable", lun)
    token = out.strip()
    assert out == token + "\n"  # one line, the whole token: scripts capture it
    assert token.startswith("lst1.")
    assert ok(cli_daemon, "state", "get", lun) == out

    result = run(cli_daemon, "state", "check", lun, token)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("intact: ")
    assert result.stderr == ""

    qemu_io(cli_daemon, lun, "write 0 4k")
    result = run(cli_daemon, "state", "check", lun, token)
    assert result.returncode == 1
    assert result.stdout.startswith("changed: ")
    assert "data was written since the token" in result.stdout
    assert result.stderr == ""
    assert ok(cli_daemon, "state", "get", lun).strip() != token

    out = ok(cli_daemon, "state", "disable", lun)
    assert out == f"released hold default on LUN {lun}; tracking is off\n"
    line = one_line_error(run(cli_daemon, "state", "get", lun), 4)
    assert "tracking is off" in line
    result = run(cli_daemon, "state", "check", lun, token)
    assert result.returncode == 1
    assert "tracking is off" in result.stdout


def test_check_exit_codes_with_json(cli_daemon: Daemon, lun: str) -> None:
    token = ok(cli_daemon, "state", "enable", lun).strip()
    assert ok_json(cli_daemon, "state", "check", lun, token)["result"] == "intact"
    qemu_io(cli_daemon, lun, "write -z 1M 64k")
    result = run(cli_daemon, "--json", "state", "check", lun, token)
    assert result.returncode == 1
    body = json.loads(result.stdout)
    assert body["result"] == "changed"
    assert body["token"] == token
    assert body["current"] != token
    assert body["reason"]


def test_check_of_garbage_is_an_invalid_argument(cli_daemon: Daemon, lun: str) -> None:
    token = ok(cli_daemon, "state", "enable", lun).strip()
    line = one_line_error(run(cli_daemon, "state", "check", lun, "not-a-token"), 2)
    assert "not a lunseal state token" in line
    # A well-formed token of another epoch is an answer, not an error: changed.
    prefix, lun_uuid, _epoch, mode, value = token.split(".")
    other = ".".join([prefix, lun_uuid, "0123456789abcdef", mode, value])
    result = run(cli_daemon, "state", "check", lun, other)
    assert result.returncode == 1
    assert result.stdout.startswith("changed: epoch 0123456789abcdef")


def test_get_while_off_is_exit_4_with_one_line(cli_daemon: Daemon, lun: str) -> None:
    for args in (("state", "get", lun), ("state", "get", lun, "--json")):
        line = one_line_error(run(cli_daemon, *args), 4)
        assert "tracking is off" in line
        assert "state enable" in line  # says what to do


@pytest.mark.parametrize(
    "position",
    [
        ("--json", "state", "get", "{lun}"),
        ("state", "--json", "get", "{lun}"),
        ("state", "get", "--json", "{lun}"),
        ("state", "get", "{lun}", "--json"),
    ],
)
def test_json_anywhere(cli_daemon: Daemon, lun: str, position: tuple[str, ...]) -> None:
    token = ok(cli_daemon, "state", "enable", lun).strip()
    body = json.loads(ok(cli_daemon, *(arg.format(lun=lun) for arg in position)))
    assert body["token"] == token
    assert body["lun"] == lun
    assert body["tracking"] is True
    assert body["holds"] == ["default"]


def test_enable_with_json_mode_and_hold(cli_daemon: Daemon, lun: str) -> None:
    body = ok_json(cli_daemon, "state", "enable", lun, "--hold", "backup", "--mode", "flag")
    assert body["name"] == "backup"
    assert ".flag." in body["token"]
    assert body["granularity"] is None
    assert body["changed_bytes"] is None
    # A second hold in the same mode shares the token; another mode must wait.
    assert ok(cli_daemon, "state", "enable", lun, "--hold", "host").strip() == body["token"]
    line = one_line_error(
        run(cli_daemon, "state", "enable", lun, "--hold", "x", "--mode", "timestamp"), 4
    )
    assert "flag mode" in line
    line = one_line_error(run(cli_daemon, "state", "enable", lun, "--hold", "host"), 4)
    assert "host" in line
    state = ok_json(cli_daemon, "state", "disable", lun, "--hold", "backup")
    assert state["holds"] == ["host"]
    assert state["token"] == body["token"]  # releasing one hold changes nothing for another
    out = ok(cli_daemon, "state", "disable", lun, "--hold", "host")
    assert out == f"released hold host on LUN {lun}; tracking is off\n"


def test_disable_with_holds_left(cli_daemon: Daemon, lun: str) -> None:
    ok(cli_daemon, "state", "enable", lun, "--hold", "a")
    ok(cli_daemon, "state", "enable", lun, "--hold", "b")
    out = ok(cli_daemon, "state", "disable", lun, "--hold", "a")
    assert out == f"released hold a on LUN {lun}; 1 hold(s) left\n"


def test_holds_listing(cli_daemon: Daemon, lun: str) -> None:
    assert ok(cli_daemon, "state", "holds", lun) == f"no holds on LUN {lun}: tracking is off\n"
    assert ok_json(cli_daemon, "state", "holds", lun) == []
    token = ok(cli_daemon, "state", "enable", lun, "--hold", "backup", "--track-changes").strip()
    ok(cli_daemon, "state", "enable", lun, "--hold", "host")
    table = table_rows(ok(cli_daemon, "state", "holds", lun))
    assert table[0] == ["HOLD", "SINCE", "CHANGE MAP", "CHANGED", "TOKEN"]
    by_name = {row[0]: row for row in table[1:]}
    assert set(by_name) == {"backup", "host"}
    assert by_name["backup"][2:] == ["64K", "0B", token]
    assert by_name["host"][2:] == ["-", "-", token]
    listed = ok_json(cli_daemon, "state", "holds", lun)
    assert [(h["name"], h["granularity"], h["token"]) for h in listed] == [
        ("backup", 64 * KiB, token),
        ("host", None, token),
    ]


# -- change maps --------------------------------------------------------------------------------


def test_nbd_writes_show_up_in_changes(cli_daemon: Daemon, lun: str) -> None:
    token = ok(cli_daemon, "state", "enable", lun, "--hold", "inc", "--track-changes=4K").strip()
    qemu_io(cli_daemon, lun, "write -P 7 8k 4k", "write -P 7 1M 12k", "discard 6M 4k", "read 0 8M")
    body = ok_json(cli_daemon, "state", "changes", lun, "--hold", "inc")
    assert body["since_token"] == token
    assert body["granularity"] == 4 * KiB
    assert body["extents"] == [
        {"offset": 8 * KiB, "length": 4 * KiB},
        {"offset": MiB, "length": 12 * KiB},
        {"offset": 6 * MiB, "length": 4 * KiB},
    ]
    assert body["changed_bytes"] == 20 * KiB

    out = ok(cli_daemon, "state", "changes", lun, "--hold", "inc")
    assert out.splitlines()[0] == f"3 changed extent(s), 20K at 4K granularity since {token}"
    table = table_rows(out.split("\n", 1)[1])
    assert table == [
        ["OFFSET", "LENGTH"],
        [str(8 * KiB), str(4 * KiB)],
        [str(MiB), str(12 * KiB)],
        [str(6 * MiB), str(4 * KiB)],
    ]


def test_track_changes_default_granularity(cli_daemon: Daemon, lun: str) -> None:
    body = ok_json(cli_daemon, "state", "enable", lun, "--track-changes")
    assert body["granularity"] == 64 * KiB
    assert body["changed_bytes"] == 0
    qemu_io(cli_daemon, lun, "write 100k 1")
    out = ok(cli_daemon, "state", "changes", lun)  # --hold default
    assert out.startswith("1 changed extent(s), 64K at 64K granularity since ")
    assert ok_json(cli_daemon, "state", "changes", lun)["extents"] == [
        {"offset": 64 * KiB, "length": 64 * KiB}
    ]


def test_changes_without_a_map_is_exit_2(cli_daemon: Daemon, lun: str) -> None:
    ok(cli_daemon, "state", "enable", lun, "--hold", "plain")
    line = one_line_error(run(cli_daemon, "state", "changes", lun, "--hold", "plain"), 2)
    assert "change map" in line


# -- errors ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "text"),
    [
        (("state", "enable", "{lun}", "--mode", "bogus"), 2, "mode"),
        (("state", "enable", "{lun}", "--track-changes=3K"), 2, "granularity"),
        (("state", "enable", "{lun}", "--track-changes=lots"), 2, "invalid size"),
        (("state", "enable", "{lun}", "--hold", "a/b"), 2, "invalid hold name"),
        (("state", "enable", "{lun}", "--hold", ""), 2, "invalid hold name"),
        (("state", "enable", "no-such-lun"), 3, "no-such-lun"),
        (("state", "get", "no-such-lun"), 3, "no-such-lun"),
        (("state", "check", "no-such-lun", "lst1.x.1.counter.1"), 3, "no-such-lun"),
        (("state", "holds", "no-such-lun"), 3, "no-such-lun"),
        (("state", "disable", "no-such-lun"), 3, "no-such-lun"),
        (("state", "disable", "{lun}", "--hold", "nobody"), 3, "nobody"),
        (("state", "changes", "{lun}", "--hold", "nobody"), 3, "nobody"),
        (("state", "changes", "no-such-lun"), 3, "no-such-lun"),
    ],
)
def test_errors_are_one_line_with_the_class_exit_code(
    cli_daemon: Daemon, lun: str, args: tuple[str, ...], code: int, text: str
) -> None:
    for extra in ((), ("--json",)):
        result = run(cli_daemon, *(a.format(lun=lun) for a in args), *extra)
        assert text in one_line_error(result, code)
    assert ok_json(cli_daemon, "state", "holds", lun) == []  # and nothing was acquired
