"""``lunseal mirror ...``: the real binary against a real daemon, for people and scripts."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lunseal.frontends.nbd import constants as c
from tests.support.cli import cli, ok, ok_json, one_line_error
from tests.support.daemon import Daemon
from tests.support.nbdclient import NbdClient

pytestmark = pytest.mark.daemon

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB
_counter = itertools.count()


# -- helpers ------------------------------------------------------------------------------------


def nbd_write(daemon: Daemon, export: str, offset: int, data: bytes) -> int:
    with NbdClient.connect(daemon.socket) as nbd:
        nbd.connect_export(export)
        for pos in range(0, len(data), 4 * MiB):
            error = nbd.write(offset + pos, data[pos : pos + 4 * MiB])
            if error:
                return error
        nbd.disconnect()
    return 0


def nbd_read(daemon: Daemon, export: str, offset: int, length: int) -> bytes:
    out = bytearray()
    with NbdClient.connect(daemon.socket) as nbd:
        nbd.connect_export(export)
        for pos in range(0, length, 4 * MiB):
            reply = nbd.read(offset + pos, min(4 * MiB, length - pos))
            assert reply.error == 0
            out += reply.data
        nbd.disconnect()
    return bytes(out)


def state(daemon: Daemon, mirror: str) -> Any:
    with daemon.client() as api:
        return api.mirror(mirror)


class Names:
    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.prefix = f"cm{next(_counter)}-"

    def __call__(self, name: str) -> str:
        return self.prefix + name

    def cleanup(self) -> None:
        with self.daemon.client() as api:
            for m in api.list_mirrors():
                if m.source.startswith(self.prefix) or m.target.startswith(self.prefix):
                    api.delete_mirror(m.name)
            for lun in api.list_luns():
                if lun.name.startswith(self.prefix):
                    api.delete_lun(lun.name, force=True)


@pytest.fixture
def names(cli_daemon: Daemon) -> Iterator[Names]:
    n = Names(cli_daemon)
    yield n
    n.cleanup()


def source_with_data(daemon: Daemon, name: str, size: int, seed: int = 1) -> bytes:
    payload = bytes([seed]) * (size // 2) + os.urandom(size // 2)
    with daemon.client() as api:
        api.create_lun(name, size)
    assert nbd_write(daemon, name, 0, payload) == 0
    return payload


def synced(daemon: Daemon, names: Names, size: int = 4 * MiB) -> tuple[str, str]:
    src, dst = names("src"), names("dst")
    source_with_data(daemon, src, size)
    ok(daemon, "mirror", "create", src, dst, "--create-target", "--wait")
    return src, dst


def row(table: str, first_cell: str) -> str:
    return next(line for line in table.splitlines() if line.split()[:1] == [first_cell])


# -- create --------------------------------------------------------------------------------------


def test_create_wait_returns_once_the_target_is_identical(cli_daemon: Daemon, names: Names) -> None:
    src, dst = names("src"), names("dst")
    payload = source_with_data(cli_daemon, src, 48 * MiB)
    assert ok(cli_daemon, "mirror", "create", src, dst, "--create-target", "--wait") == (
        f"mirror {dst}: synced\n"
    )
    info = state(cli_daemon, dst)
    assert info.state == "synced"
    assert info.bytes_copied == 48 * MiB  # --wait waited for the whole copy
    assert nbd_read(cli_daemon, dst, 0, 48 * MiB) == payload


def test_create_wait_json_prints_the_finished_mirror(cli_daemon: Daemon, names: Names) -> None:
    src, dst = names("src"), names("dst")
    source_with_data(cli_daemon, src, 32 * MiB)
    info = ok_json(cli_daemon, "mirror", "create", src, dst, "--create-target", "--wait")
    assert info["state"] == "synced"
    assert (info["name"], info["source"], info["target"]) == (dst, src, dst)
    assert info["bytes_copied"] == 32 * MiB
    assert (info["bytes_left"], info["percent_done"]) == (0, 100.0)
    assert (info["split_at"], info["target_access"], info["reason"]) == (None, "ro", "")


def test_create_without_wait_reports_the_running_copy(
    cli_daemon: Daemon, names: Names, tmp_path: Path
) -> None:
    image = tmp_path / "big.raw"
    with image.open("wb") as f:
        for i in range(256):
            f.write(bytes([i % 200 + 1]) * MiB)
    src, dst = names("big"), names("copy")
    with cli_daemon.client() as api:
        api.create_lun(src, None, path=str(image))
    out = ok(cli_daemon, "mirror", "create", src, dst, "--create-target", "--name", names("m"))
    assert out == f"mirror {names('m')}: syncing, 0.0% done, 256M left\n"
    deadline = time.monotonic() + 60
    while state(cli_daemon, names("m")).state == "syncing":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    info = state(cli_daemon, dst)
    assert (info.state, info.bytes_copied) == ("synced", 256 * MiB)


def test_create_picks_an_existing_target_and_a_name(cli_daemon: Daemon, names: Names) -> None:
    src, dst = names("src"), names("dst")
    source_with_data(cli_daemon, src, 4 * MiB)
    with cli_daemon.client() as api:
        api.create_lun(dst, 4 * MiB)
    info = ok_json(cli_daemon, "mirror", "create", src, dst, "--name", names("weekly"), "--wait")
    assert (info["name"], info["target"], info["state"]) == (names("weekly"), dst, "synced")
    assert ok_json(cli_daemon, "mirror", "status", dst)[0]["name"] == names("weekly")


# -- status ----------------------------------------------------------------------------------------


def test_status_prints_a_table_row_per_mirror(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    other = names("other")
    ok(cli_daemon, "mirror", "create", src, other, "--create-target", "--wait")
    ok(cli_daemon, "mirror", "split", other, "--target-access", "rw")
    assert nbd_write(cli_daemon, src, 0, b"s" * (2 * G)) == 0
    assert nbd_write(cli_daemon, other, 3 * MiB, b"t" * 10) == 0

    out = ok(cli_daemon, "mirror", "status")
    header = out.splitlines()[0]
    for column in ("MIRROR", "SOURCE", "TARGET", "STATE", "DONE", "LEFT", "DIRTY S/T", "SPLIT AT"):
        assert column in header  # on one line: the table is never folded
    synced_row, split_row = row(out, dst).split(), row(out, other).split()
    assert synced_row[:3] == [dst, "│", src]
    assert "synced" in synced_row
    assert "100.0%" in synced_row
    assert "split" in split_row
    assert "2/1" in split_row  # regions written on the source / on the target
    assert "192K" in split_row  # the union left to copy
    assert "-" in synced_row  # never split
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d", split_row[-1])

    one = ok(cli_daemon, "mirror", "status", other)
    assert row(one, other)
    assert dst not in one


def test_status_json(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    everything = ok_json(cli_daemon, "mirror", "status")
    mine = [m for m in everything if m["source"] == src]
    assert [m["name"] for m in mine] == [dst]
    one = ok_json(cli_daemon, "mirror", "status", dst)
    assert isinstance(one, list)
    assert len(one) == 1
    assert set(one[0]) == {
        "id",
        "name",
        "source",
        "target",
        "state",
        "percent_done",
        "bytes_left",
        "bytes_copied",
        "source_dirty_regions",
        "target_dirty_regions",
        "granularity",
        "split_at",
        "target_access",
        "reason",
    }
    assert (one[0]["state"], one[0]["granularity"]) == ("synced", G)
    assert ok_json(cli_daemon, "--json", "mirror", "status", dst) == one  # --json after too
    assert json.loads(ok(cli_daemon, "mirror", "status", dst, "--json")) == one


def test_status_without_mirrors_says_how_to_make_one(daemon: Daemon) -> None:
    assert ok(daemon, "mirror", "status") == (
        "no mirrors (create one with: lunseal mirror create SOURCE TARGET)\n"
    )
    assert ok_json(daemon, "mirror", "status") == []


# -- split, resync, restore ------------------------------------------------------------------------


def test_split_resync_and_restore(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    assert ok(cli_daemon, "mirror", "split", dst, "--target-access", "rw") == (
        f"mirror {dst}: split\n"
    )
    assert nbd_write(cli_daemon, src, G - 1, b"S" * 2) == 0  # regions 0 and 1
    assert nbd_write(cli_daemon, dst, 3 * MiB, b"T" * 4096) == 0

    assert ok(cli_daemon, "mirror", "resync", dst, "--wait") == f"mirror {dst}: synced\n"
    info = state(cli_daemon, dst)
    assert (info.state, info.bytes_copied) == ("synced", 3 * G)
    assert nbd_read(cli_daemon, dst, 0, 4 * MiB) == nbd_read(cli_daemon, src, 0, 4 * MiB)

    split = ok_json(cli_daemon, "mirror", "split", dst)
    assert (split["state"], split["target_access"]) == ("split", "ro")
    assert split["split_at"] > 0
    assert nbd_write(cli_daemon, dst, 0, b"x") == c.EPERM
    backup = nbd_read(cli_daemon, dst, 0, 4 * MiB)
    assert nbd_write(cli_daemon, src, 2 * MiB, b"oops" * 100) == 0

    restored = ok_json(cli_daemon, "mirror", "restore", dst, "--wait")
    assert (restored["state"], restored["bytes_copied"]) == ("split", G)
    assert nbd_read(cli_daemon, src, 0, 4 * MiB) == backup

    assert ok(cli_daemon, "mirror", "restore", dst, "--wait") == f"mirror {dst}: split\n"
    assert ok_json(cli_daemon, "mirror", "resync", dst, "--wait")["state"] == "synced"


def test_resync_without_wait_returns_while_it_copies(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names, size=256 * MiB)
    ok(cli_daemon, "mirror", "split", dst)
    assert nbd_write(cli_daemon, src, 0, os.urandom(128 * MiB)) == 0
    out = ok(cli_daemon, "mirror", "resync", dst)
    assert re.fullmatch(rf"mirror {dst}: resyncing, [\d.]+% done, \S+ left\n", out), out
    deadline = time.monotonic() + 60
    while state(cli_daemon, dst).state != "synced":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert state(cli_daemon, dst).bytes_copied == 128 * MiB


# -- delete ----------------------------------------------------------------------------------------


def test_delete_keeps_both_luns(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    assert ok(cli_daemon, "mirror", "delete", dst) == f"deleted mirror {dst}\n"
    with cli_daemon.client() as api:
        luns = {lun.name for lun in api.list_luns()}
        assert {src, dst} <= luns
        assert dst not in {m.name for m in api.list_mirrors()}
    assert nbd_write(cli_daemon, dst, 0, b"writable again") == 0

    # dst holds data now: a new mirror over it must be asked for.
    one_line_error(cli(cli_daemon, "mirror", "create", src, dst), 4)
    ok(cli_daemon, "mirror", "create", src, dst, "--force")
    assert ok_json(cli_daemon, "mirror", "delete", dst) is None


# -- errors ----------------------------------------------------------------------------------------


@pytest.fixture
def error_setup(cli_daemon: Daemon, names: Names) -> Names:
    synced(cli_daemon, names)
    with cli_daemon.client() as api:
        api.create_lun(names("small"), 2 * MiB)
        api.create_lun(names("free"), 4 * MiB)
    return names


ERRORS: list[tuple[list[str], int, str]] = [
    (["status", "nope"], 3, "no mirror named 'nope'"),
    (["split", "nope"], 3, "no mirror named 'nope'"),
    (["resync", "nope", "--wait"], 3, "no mirror named 'nope'"),
    (["restore", "nope"], 3, "no mirror named 'nope'"),
    (["delete", "nope"], 3, "no mirror named 'nope'"),
    (["create", "{src}", "{missing}"], 3, "use create_target"),
    (["create", "{missing}", "{dst}"], 3, "no LUN named"),
    (["create", "{src}", "{small}"], 2, "same size"),
    (["create", "{src}", "{src}"], 2, "cannot mirror itself"),
    (["create", "{free}", "{dst}", "--name", "{x}"], 4, "already belongs to mirror"),
    (["create", "{dst}", "{free}"], 4, "is the target of mirror"),
    (["create", "{src}", "{free}", "--name", "{dst}"], 4, "already exists"),
    (["restore", "{dst}"], 4, "restore needs a split mirror"),
    (["resync", "{dst}", "--wait"], 4, "resync needs split or degraded"),
    (["split", "{dst}", "--target-access", "wo"], 2, "ro or rw"),
]


@pytest.mark.parametrize(
    ("args", "code", "message"), ERRORS, ids=[" ".join(a) for a, _, _ in ERRORS]
)
@pytest.mark.parametrize("json_output", [False, True], ids=["human", "json"])
def test_errors_print_one_line_and_change_nothing(
    cli_daemon: Daemon,
    error_setup: Names,
    args: list[str],
    code: int,
    message: str,
    json_output: bool,
) -> None:
    n = error_setup
    filled = [
        a.format(
            src=n("src"),
            dst=n("dst"),
            small=n("small"),
            free=n("free"),
            missing=n("missing"),
            x=n("x"),
        )
        for a in args
    ]
    with cli_daemon.client() as api:
        before = (
            sorted(lun.name for lun in api.list_luns()),
            [(m.name, m.state) for m in api.list_mirrors()],
        )
    prefix = ["--json"] if json_output else []
    line = one_line_error(cli(cli_daemon, *prefix, "mirror", *filled), code)
    assert message in line
    with cli_daemon.client() as api:
        after = (
            sorted(lun.name for lun in api.list_luns()),
            [(m.name, m.state) for m in api.list_mirrors()],
        )
    assert after == before


def test_mirrored_luns_need_force_to_be_deleted(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    for lun in (src, dst):
        line = one_line_error(cli(cli_daemon, "lun", "delete", lun), 4)
        assert f"belongs to mirror(s) {dst}" in line
        assert "force" in line
        one_line_error(cli(cli_daemon, "lun", "grow", lun, "8M"), 4)
    assert ok(cli_daemon, "lun", "delete", dst, "--force") == f"deleted LUN {dst}\n"
    one_line_error(cli(cli_daemon, "mirror", "status", dst), 3)


# -- a failing target ------------------------------------------------------------------------------


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_wait_fails_when_the_target_fails_and_resync_heals_it(
    cli_daemon: Daemon, names: Names, tmp_path: Path
) -> None:
    """An immutable backing file makes every write of the target fail with EPERM
    (the daemon opened it before): the mirror degrades, hosts never notice."""
    src, dst = names("src"), names("dst")
    image = tmp_path / "target.raw"
    source_with_data(cli_daemon, src, 4 * MiB)
    with cli_daemon.client() as api:
        api.create_lun(dst, 4 * MiB, path=str(image))
    ok(cli_daemon, "mirror", "create", src, dst, "--wait")
    if not _chattr("+i", image):
        pytest.skip("chattr +i needs root on a file system with immutable files")
    try:
        assert nbd_write(cli_daemon, src, MiB, b"host write" * 100) == 0
        info = ok_json(cli_daemon, "mirror", "status", dst)[0]
        assert info["state"] == "degraded"
        assert "failed" in info["reason"]
        assert info["source_dirty_regions"] >= 1
        status = ok(cli_daemon, "mirror", "status", dst)
        assert "degraded" in row(status, dst).split()
        assert f"{dst}: {info['reason']}\n" in status  # the reason in full, below the table

        line = one_line_error(cli(cli_daemon, "mirror", "resync", dst, "--wait"), 1)
        assert f"mirror {dst} is degraded" in line
        assert state(cli_daemon, dst).state == "degraded"
    finally:
        assert _chattr("-i", image)

    assert ok(cli_daemon, "mirror", "resync", dst, "--wait") == f"mirror {dst}: synced\n"
    assert nbd_read(cli_daemon, dst, 0, 4 * MiB) == nbd_read(cli_daemon, src, 0, 4 * MiB)


# -- ids, guards, what hosts may do -----------------------------------------------------------


def test_the_id_from_status_json_is_accepted_everywhere(cli_daemon: Daemon, names: Names) -> None:
    _, dst = synced(cli_daemon, names)
    [info] = [m for m in ok_json(cli_daemon, "mirror", "status") if m["target"] == dst]
    mirror_id = info["id"]
    assert ok_json(cli_daemon, "mirror", "split", mirror_id)["state"] == "split"
    assert ok_json(cli_daemon, "mirror", "resync", mirror_id, "--wait")["state"] == "synced"
    assert ok_json(cli_daemon, "mirror", "status", mirror_id)[0]["name"] == dst
    ok(cli_daemon, "mirror", "delete", mirror_id)


def test_create_over_a_target_holding_data_needs_force(cli_daemon: Daemon, names: Names) -> None:
    src, dst = names("src"), names("dst")
    source_with_data(cli_daemon, src, 4 * MiB)
    kept = source_with_data(cli_daemon, dst, 4 * MiB, seed=7)
    line = one_line_error(cli(cli_daemon, "mirror", "create", src, dst, "--wait"), 4)
    assert f"target LUN {dst} is not empty (data at byte 0)" in line
    assert "force" in line
    assert nbd_read(cli_daemon, dst, 0, 4 * MiB) == kept
    ok(cli_daemon, "mirror", "create", src, dst, "--wait", "--force")
    assert nbd_read(cli_daemon, dst, 0, 4 * MiB) == nbd_read(cli_daemon, src, 0, 4 * MiB)


def test_restore_while_a_host_is_connected_needs_force(cli_daemon: Daemon, names: Names) -> None:
    src, dst = synced(cli_daemon, names)
    ok(cli_daemon, "mirror", "split", dst)
    copy = nbd_read(cli_daemon, dst, 0, 4 * MiB)
    assert nbd_write(cli_daemon, src, 0, b"\x99" * G) == 0
    with NbdClient.connect(cli_daemon.socket) as host:
        host.connect_export(src)
        line = one_line_error(cli(cli_daemon, "mirror", "restore", dst), 4)
        assert f"would rewrite LUN {src} while 1 host connection(s) use it (unix pid " in line
        assert state(cli_daemon, dst).state == "split"
        ok(cli_daemon, "mirror", "restore", dst, "--wait", "--force")
        host.disconnect()
    assert nbd_read(cli_daemon, src, 0, 4 * MiB) == copy


def test_lun_show_says_a_split_target_is_read_only_and_why(
    cli_daemon: Daemon, names: Names
) -> None:
    _, dst = synced(cli_daemon, names)
    ok(cli_daemon, "mirror", "split", dst)
    shown = ok(cli_daemon, "lun", "show", dst)
    mode = next(line for line in shown.splitlines() if line.startswith("mode"))
    assert mode.split(None, 1)[1] == f"read-only (it is the target of mirror {dst} (split))"
    info = ok_json(cli_daemon, "lun", "show", dst)
    assert (info["read_only"], info["read_only_reason"]) == (
        True,
        f"it is the target of mirror {dst} (split)",
    )
    assert nbd_write(cli_daemon, dst, 0, b"x") == c.EPERM  # what it says is what hosts get
