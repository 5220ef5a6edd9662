"""``lunseal backup list|show|verify|prune``, ``archive check``, ``restore``
argument handling and ``lunseal demo``, as real processes."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

import pytest

from lunseal.units import format_size
from tests.host.backup import (
    CHUNK,
    MiB,
    backup,
    chunk_files,
    create_lun,
    equals,
    fill_random,
    lunseal,
    lunseal_json,
    manifest_files,
    restore,
    save,
    write,
)
from tests.support.daemon import LUNSEAL, Daemon

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
    assert re.search(rf"^ {ids[2]} .* keep\s*$", human, re.M), human
    assert human.splitlines()[-1].startswith("removed 0 backup(s) and 0 chunk(s), ")


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


def test_prune_keeps_per_source_lun(cli_daemon: Daemon, archive: Path) -> None:
    db1 = series(cli_daemon, archive, "pg-db1", 3)
    other = series(cli_daemon, archive, "pg-web", 1)

    plan = lunseal_json(cli_daemon, archive, "backup", "prune", "--keep-last", "2", "--dry-run")
    assert plan["removed"] == db1[:1]  # not two of db1 to make room for web's one
    assert set(plan["kept"]) == {*db1[1:], *other}
    assert [(d["backup"], d["source"], d["keep"]) for d in plan["decisions"]] == [
        (db1[0], "pg-db1", False),
        (db1[1], "pg-db1", True),
        (db1[2], "pg-db1", True),
        (other[0], "pg-web", True),
    ]
    human = lunseal(cli_daemon, archive, "backup", "prune", "--keep-last", "2", "--dry-run").stdout
    lines = human.splitlines()
    cells = [re.split(r"[\s│]+", line.strip()) for line in lines]
    assert [db1[0], "pg-db1"] == cells[2][:2]
    assert cells[2][3:] == ["would", "remove"]
    assert (cells[5][:2], cells[5][3:]) == ([other[0], "pg-web"], ["keep"])
    assert lines[-1].startswith("would remove 1 backup(s) and ")
    assert len(manifest_files(archive)) == 4

    # One group only: web's single backup is never looked at.
    only = lunseal_json(
        cli_daemon, archive, "backup", "prune", "--keep-last", "1", "--source", "pg-db1"
    )
    assert (only["removed"], only["kept"]) == (db1[:2], db1[2:])
    left = [m["id"] for m in lunseal_json(cli_daemon, archive, "backup", "list")]
    assert left == [db1[2], other[0]]


def test_show_of_a_missing_backup_is_not_found(cli_daemon: Daemon, archive: Path) -> None:
    series(cli_daemon, archive, "sh-a", 1)
    for backup_id in ("nope", "20000101T000000Z-abcdef"):
        proc = lunseal(cli_daemon, archive, "backup", "show", backup_id, ok=False)
        assert proc.returncode == 3, proc.stderr
        assert "no backup" in proc.stderr
        assert backup_id in proc.stderr


# -- on a terminal ---------------------------------------------------------------------------


def on_a_terminal(daemon: Daemon, archive: Path, *args: str, timeout: float = 90) -> str:
    """Run ``lunseal ARGS`` with stdout and stderr on one pseudo-terminal (80x24) and
    return everything it wrote, escape sequences included."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"LUNSEAL_HOME": str(daemon.home), "LUNSEAL_ARCHIVE": str(archive), "TERM": "xterm"}
    proc = subprocess.Popen([LUNSEAL, *args], stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            out += chunk
        assert proc.wait(timeout=max(1.0, deadline - time.monotonic())) == 0, out.decode()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return out.decode(errors="replace")


_CSI = re.compile(r"\x1b\[([?0-9;]*)([A-Za-z])")


def screen(raw: str) -> list[str]:
    """What a terminal shows after ``raw``: the few control sequences rich uses
    (cursor up/down/column, erase line), text overwriting in place."""
    lines, row, col = [""], 0, 0
    pos = 0
    while pos < len(raw):
        m = _CSI.match(raw, pos)
        if m:
            arg, op = m.group(1), m.group(2)
            n = int(arg) if arg.isdigit() else 1
            if op == "A":
                row = max(0, row - n)
            elif op == "B":
                row += n
            elif op == "G":
                col = n - 1
            elif op == "K":
                lines[row] = lines[row][:col] if arg in ("", "0") else ""
            pos = m.end()
            while len(lines) <= row:
                lines.append("")
            continue
        ch = raw[pos]
        pos += 1
        if ch == "\r":
            col = 0
        elif ch == "\n":
            row += 1
            while len(lines) <= row:
                lines.append("")
        elif ch >= " ":
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1 :]
            col += 1
    return [line.rstrip() for line in lines if line.strip()]


def test_results_stay_on_screen_under_the_progress_bars(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    create_lun(daemon, "tty", 64 * MiB)
    fill_random(daemon, "tty", tmp_path, 48 * MiB)

    raw = on_a_terminal(daemon, archive, "backup", "create", "tty", "--mirror", "tty-copy")
    shown = screen(raw)
    backup_id = json.loads(lunseal(daemon, archive, "backup", "list", "--json").stdout)[0]["id"]
    assert shown[-1] == f"backup ID: {backup_id}", shown
    assert any(line.startswith(f"backup {backup_id}: full, read ") for line in shown), shown
    assert any(line.startswith("split mirror tty-copy") for line in shown), shown

    write(daemon, "tty", 0, 4 * MiB, 0x42)
    raw = on_a_terminal(daemon, archive, "restore", backup_id, "--from", "archive")
    shown = screen(raw)
    assert shown[-1] == f"restored backup {backup_id} to LUN tty: verified", shown
    assert f"verified: LUN tty equals backup {backup_id} (64 chunks)" in shown, shown
    # Every bar drawn counts bytes of this 64 MiB LUN, never "0/1 bytes" or chunks as KiB.
    text = _CSI.sub("", raw)
    sizes = re.findall(r"(\d+(?:\.\d+)?)/(\d+(?:\.\d+)?) (bytes|KiB|MiB)", text)
    assert sizes, text  # bars were drawn (they take longer than a refresh)
    assert ("0", "1", "bytes") not in sizes
    for _, total, unit in sizes:
        assert unit == "MiB", sizes
        assert float(total) in (48.0, 64.0), sizes  # stored data, or the LUN
