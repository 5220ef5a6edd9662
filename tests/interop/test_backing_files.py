"""Backing files with real daemons and real clients: a missing file makes one LUN
unavailable while the others serve; a file in use by another daemon is refused."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.errors import Conflict, LunUnavailable
from tests.interop.helpers import TOOL_TIMEOUT, MiB, qemu_io, run
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 4 * MiB


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for d in started:
        d.kill()


def start(daemons: list[Daemon], home: Path) -> Daemon:
    d = Daemon(home, extra_args=["--no-demo"]).start()
    daemons.append(d)
    return d


def exports(d: Daemon) -> set[str]:
    listed = json.loads(run("nbdinfo", "--list", "--json", d.uri("")).stdout)["exports"]
    return {e["export-name"] for e in listed}


def test_a_missing_backing_file_makes_only_its_lun_unavailable(
    daemons: list[Daemon], tmp_path: Path
) -> None:
    require_tools("nbdinfo", "qemu-io")
    ext = tmp_path / "ext.img"
    ext.write_bytes(bytes(SIZE))
    d = start(daemons, tmp_path / "home")
    with d.client() as api:
        api.create_lun("good", SIZE)
        api.create_lun("ext", None, path=str(ext))
        before = api.acquire_hold("ext", "backup").token
    qemu_io(d.uri("good"), "write -P 0x5a 0 64k")
    assert d.stop() == 0, d.log()
    moved = ext.rename(tmp_path / "moved.img")

    d.start()
    # The other LUN still serves, with its data.
    qemu_io(d.uri("good"), "read -P 0x5a 0 64k")
    listed = json.loads(d.cli("--json", "lun", "list", check=True).stdout)
    broken = next(lun for lun in listed if lun["name"] == "ext")
    assert broken["available"] is False
    assert "does not exist" in broken["unavailable_reason"]
    human = d.cli("lun", "list", check=True).stdout
    assert "LUN ext is unavailable" in human
    # Opening the export fails with the reason; NBD LIST leaves it out, or
    # nbdinfo --list would give up on every export.
    # (libnbd shows the server's message only in its debug output.)
    refused = subprocess.run(
        ["nbdinfo", d.uri("ext")],
        capture_output=True,
        text=True,
        timeout=TOOL_TIMEOUT,
        env={**os.environ, "LIBNBD_DEBUG": "1"},
        check=False,
    )
    assert refused.returncode != 0
    assert "export 'ext' is unavailable: backing file" in refused.stderr, refused.stderr
    assert exports(d) == {"good"}
    with d.client() as api:
        for call in (
            lambda: api.token("ext"),
            lambda: api.acquire_hold("ext", "another"),
            lambda: api.grow_lun("ext", 2 * SIZE),
            lambda: api.create_mirror("good", "ext"),
        ):
            with pytest.raises(LunUnavailable, match="LUN ext is unavailable"):
                call()
    shown = d.cli("lun", "show", "ext")
    assert "NO: backing file" in shown.stdout, shown

    # Re-point at the moved file: the LUN serves again and its state changed.
    repointed = d.cli("lun", "repoint", "ext", "--file", str(moved))
    assert repointed.returncode == 0, repointed.stderr
    assert f"now uses {moved}" in repointed.stdout
    info = run("nbdinfo", "--json", d.uri("ext")).stdout
    assert json.loads(info)["exports"][0]["export-size"] == SIZE
    assert exports(d) == {"good", "ext"}
    with d.client() as api:
        assert api.show_lun("ext").available
        check = api.check_token("ext", before)
    assert check.result == "changed"
    assert "re-pointed" in check.reason
    assert check.current != before
    assert d.stop() == 0, d.log()


def test_a_second_daemon_cannot_serve_a_file_in_use(daemons: list[Daemon], tmp_path: Path) -> None:
    shared = tmp_path / "shared.img"
    shared.write_bytes(bytes(SIZE))
    first = start(daemons, tmp_path / "first")
    second = start(daemons, tmp_path / "second")
    with first.client() as api:
        api.create_lun("a", None, path=str(shared))
    pid = json.loads((first.home / "daemon.json").read_text())["pid"]

    with second.client() as api:
        with pytest.raises(Conflict) as refused:
            api.create_lun("b", None, path=str(shared))
        assert str(first.home) in refused.value.message
        assert f"pid {pid}" in refused.value.message
        # Nor through a hard link, nor the first daemon's own LUN files.
        (tmp_path / "hard.img").hardlink_to(shared)
        with pytest.raises(Conflict, match="locked by the lunseal array"):
            api.create_lun("b", None, path=str(tmp_path / "hard.img"))
        assert [lun.name for lun in api.list_luns()] == []

    # The first daemon stops: its lock goes with it and the second may use the file.
    assert first.stop() == 0, first.log()
    with second.client() as api:
        assert api.create_lun("b", None, path=str(shared)).size == SIZE
    # Now the first daemon starts with its LUN unavailable, naming who holds the file.
    first.start()
    with first.client() as api:
        lun = api.show_lun("a")
    assert lun.available is False
    assert lun.unavailable_reason is not None
    assert str(second.home) in lun.unavailable_reason
    assert first.stop() == 0, first.log()
    assert second.stop() == 0, second.log()
