"""``lunseal backup list|show|verify|prune``, ``archive check``, ``restore``
argument handling and ``lunseal demo``, as real processes."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from lunseal.units import format_size
from tests.backup import (
    CHUNK,
    LUNSEAL,
    MiB,
    backup,
    chunk_files,
    create_lun,
    equals,
    lunseal,
    lunseal_json,
    manifest_files,
    restore,
    save,
    write,
)
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

SIZE = 16 * MiB


def series(daemon: Daemon, archive: Path, lun: str, count: int) -> list[str]:
    """``count`` backups of a new LUN, each after new data in its first chunk."""
    create_lun(daemon, lun, SIZE)
    ids = []
    for n in range(count):
        write(daemon, lun, 0, MiB, 0x40 + n)
        ids.append(backup(daemon, archive, lun, f"{lun}-copy")["id"])
    return ids


def test_list_and_show(cli_daemon: Daemon, archive: Path) -> None:
    proc = lunseal(cli_daemon, archive, "backup", "list", ok=False)
    assert proc.returncode == 3  # NotFound: there is no archive yet
    assert f"archive directory {archive} does not exist" in proc.stderr

    first, second = series(cli_daemon, archive, "ls-a", 2)
    listed = lunseal_json(cli_daemon, archive, "backup", "list")
    assert [m["id"] for m in listed] == [first, second]  # oldest first
    assert [m["mode"] for m in listed] == ["full", "incremental"]
    assert [m["parent"] for m in listed] == [None, first]
    for m in listed:
        assert (m["source"], m["target"], m["mirror"]) == ("ls-a", "ls-a-copy", "ls-a-copy")
        assert (m["size"], m["chunk_size"], m["chunks"]) == (SIZE, CHUNK, SIZE // CHUNK)
        assert m["token"].startswith("lst1.")
    assert (listed[0]["bytes_read"], listed[1]["bytes_read"]) == (SIZE, CHUNK)
    # --json anywhere on the command line.
    assert json.loads(lunseal(cli_daemon, archive, "--json", "backup", "list").stdout) == listed

    human = lunseal(cli_daemon, archive, "backup", "list").stdout
    read = format_size(CHUNK)
    assert re.search(rf"{second}\s.*ls-a\s.*ls-a-copy\s.*incremental\s.*16M\s.*{read}", human)
    assert first in human

    shown = lunseal_json(cli_daemon, archive, "backup", "show", second)
    assert shown == listed[1]
    assert shown["stored_chunks"] == 1  # chunk 0 holds data; the others are zeros
    human = lunseal(cli_daemon, archive, "backup", "show", second).stdout
    assert re.search(rf"^id\s+{second}$", human, re.M)
    assert re.search(r"^mode\s+incremental$", human, re.M)
    assert re.search(rf"^parent\s+{first}$", human, re.M)

    proc = lunseal(cli_daemon, archive, "backup", "show", "20000101T000000Z-abcdef", ok=False)
    assert proc.returncode == 3
    assert "no backup 20000101T000000Z-abcdef in the archive" in proc.stderr
    proc = lunseal(cli_daemon, archive, "backup", "show", "../../etc/passwd", ok=False)
    assert proc.returncode == 2
    assert "invalid backup id" in proc.stderr

    out = lunseal(cli_daemon, archive, "backup", "verify", first).stdout
    assert out.strip() == f"backup {first}: all {SIZE // CHUNK} chunks verified"
    assert lunseal_json(cli_daemon, archive, "backup", "verify", second) == {
        "backup": second,
        "ok": True,
    }
    assert lunseal(cli_daemon, archive, "archive", "check", "--read-data").stdout.strip() == (
        "archive OK"
    )


def test_archive_option_wins_over_the_environment(
    cli_daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    create_lun(cli_daemon, "opt-a", SIZE)
    write(cli_daemon, "opt-a", 0, MiB)
    taken = lunseal_json(
        cli_daemon, archive, "backup", "create", "opt-a", "--mirror", "opt-a-copy",
        "--archive", str(elsewhere),
    )  # fmt: skip
    assert manifest_files(elsewhere) == [elsewhere / "manifests" / f"{taken['id']}.json"]
    assert not archive.exists()
    listed = lunseal_json(cli_daemon, archive, "backup", "list", "--archive", str(elsewhere))
    assert [m["id"] for m in listed] == [taken["id"]]
    check = lunseal_json(cli_daemon, archive, "archive", "check", str(elsewhere))
    assert check["ok"] is True


def test_prune_keep_last(cli_daemon: Daemon, archive: Path, tmp_path: Path) -> None:
    ids = series(cli_daemon, archive, "pr-a", 3)
    newest_content = save(cli_daemon, "pr-a", tmp_path / "newest.raw")
    chunks_before = chunk_files(archive)

    plan = lunseal_json(cli_daemon, archive, "backup", "prune", "--keep-last", "1", "--dry-run")
    assert (plan["kept"], plan["removed"], plan["dry_run"]) == (ids[2:], ids[:2], True)
    assert plan["chunks_removed"] == 2  # chunk 0 of the first two backups
    assert plan["bytes_freed"] > 0
    assert len(manifest_files(archive)) == 3
    assert chunk_files(archive) == chunks_before
    daily = lunseal_json(cli_daemon, archive, "backup", "prune", "--keep-daily", "1", "--dry-run")
    assert daily["kept"] == ids[2:]  # all on one day: the newest of it

    done = lunseal_json(cli_daemon, archive, "backup", "prune", "--keep-last", "1")
    assert {k: v for k, v in done.items() if k != "dry_run"} == {
        k: v for k, v in plan.items() if k != "dry_run"
    }
    assert done["dry_run"] is False
    assert [m["id"] for m in lunseal_json(cli_daemon, archive, "backup", "list")] == ids[2:]
    assert len(chunk_files(archive)) == len(chunks_before) - 2
    assert lunseal_json(cli_daemon, archive, "archive", "check", "--read-data")["ok"] is True
    # The survivor is an incremental whose parents are gone: still whole.
    write(cli_daemon, "pr-a", 0, SIZE, 0x00)
    assert restore(cli_daemon, archive, ids[2], "--from", "archive")["path"] == "archive"
    assert equals(cli_daemon, "pr-a", newest_content)

    human = lunseal(cli_daemon, archive, "backup", "prune", "--keep-last", "5").stdout
    assert f"kept: ['{ids[2]}']" in human
    assert "removed: []" in human


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["backup", "prune"], "give --keep-last and/or --keep-daily"),
        (["backup", "prune", "--keep-last", "0"], "at least 1"),
        (
            ["restore", "20000101T000000Z-abcdef", "--from", "tape"],
            "--from takes archive or mirror",
        ),
    ],
)
def test_bad_arguments(cli_daemon: Daemon, archive: Path, args: list[str], message: str) -> None:
    series(cli_daemon, archive, f"arg-{len(args)}-{len(message)}", 1)
    proc = lunseal(cli_daemon, archive, *args, ok=False)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr


def test_backup_create_of_a_missing_lun(cli_daemon: Daemon, archive: Path) -> None:
    proc = lunseal(
        cli_daemon, archive, "backup", "create", "no-such-lun", "--mirror", "x-copy", ok=False
    )
    assert proc.returncode == 3, proc.stderr
    assert "no-such-lun" in proc.stderr
    assert manifest_files(archive) == []


def test_demo(tmp_path: Path) -> None:
    """``lunseal demo`` tells the story through both restore paths and leaves no
    daemon and no files behind (the limit only catches a hang, not a slow machine)."""
    proc = subprocess.run(
        [LUNSEAL, "demo"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "TMPDIR": str(tmp_path)},
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "restored (mirror path): content of app" in out
    assert re.search(r"restored \((hybrid|archive) path\): content of app", out)
    assert out.count("equals the backup") == 2
    assert "DIFFERS" not in out
    assert "done" in out.splitlines()[-1]
    pid = int(re.search(r"\(pid (\d+)\)", out).group(1))  # type: ignore[union-attr]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert list(tmp_path.iterdir()) == []
