"""``lunseal lun repoint`` and how refused backing files look on the command line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.support.cli import cli, ok, ok_json, one_line_error
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20


def test_repoint_moves_a_lun_to_another_file(cli_daemon: Daemon, tmp_path: Path) -> None:
    old, new = tmp_path / "old.img", tmp_path / "new.img"
    old.write_bytes(bytes(MiB))
    new.write_bytes(bytes(MiB))
    ok(cli_daemon, "lun", "create", "cli-repoint", "--file", str(old))
    assert ok(cli_daemon, "lun", "repoint", "cli-repoint", "--file", str(new)) == (
        f"LUN cli-repoint now uses {new}\n"
    )
    shown = ok_json(cli_daemon, "lun", "show", "cli-repoint")
    assert shown["path"] == str(new)
    assert shown["available"] is True
    assert re.search(r"^available +yes$", ok(cli_daemon, "lun", "show", "cli-repoint"), re.M)


@pytest.mark.parametrize(
    ("target", "code", "words"),
    [
        ("catalog", 2, "inside the lunseal data directory"),
        ("small", 2, "same size"),
        ("used", 4, "same file as the backing file of LUN cli-used"),
    ],
)
def test_refused_repoint_is_one_line(
    cli_daemon: Daemon, tmp_path: Path, target: str, code: int, words: str
) -> None:
    files = {
        "catalog": cli_daemon.home / "catalog.sqlite",
        "small": tmp_path / "small.img",
        "used": tmp_path / "used.img",
    }
    files["small"].write_bytes(bytes(MiB // 2))
    files["used"].write_bytes(bytes(MiB))
    name = f"cli-refused-{target}"
    ok(cli_daemon, "lun", "create", name, "1M")
    if target == "used":
        ok(cli_daemon, "lun", "create", "cli-used", "--file", str(files["used"]))
    line = one_line_error(
        cli(cli_daemon, "lun", "repoint", name, "--file", str(files[target])), code
    )
    assert words in line
