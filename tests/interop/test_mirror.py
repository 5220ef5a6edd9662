"""Mirrors seen by real NBD clients: qemu-img, qemu-io and fio against a real daemon."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from tests.interop.helpers import MiB, QemuIoSession, qemu_io, random_file, run, sha256, wait_until
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

KiB = 1 << 10
G = 64 * KiB
SIZE = 256 * MiB


def lunseal(daemon: Daemon, *args: str) -> str:
    result = daemon.cli(*args)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    assert result.stderr == ""
    return result.stdout


def status(daemon: Daemon, mirror: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = json.loads(lunseal(daemon, "--json", "mirror", "status", mirror))
    assert len(found) == 1
    return found[0]


def compare(daemon: Daemon, a: str, b: str, *, check: bool = True) -> int:
    proc = run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", daemon.uri(a), daemon.uri(b), check=check
    )
    return proc.returncode


def written(daemon: Daemon, lun: str) -> int:
    with daemon.client() as api:
        return api.show_lun(lun).stats.bytes_written


def fill(daemon: Daemon, lun: str, image: Path) -> None:
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), daemon.uri(lun))


def synced(daemon: Daemon, tmp_path: Path, size: int = 64 * MiB) -> None:
    """LUN src with random data, mirrored to dst."""
    with daemon.client() as api:
        api.create_lun("src", size)
    fill(daemon, "src", random_file(tmp_path / "src.raw", size))
    lunseal(daemon, "mirror", "create", "src", "dst", "--create-target", "--wait")
    assert status(daemon, "dst")["state"] == "synced"


def test_initial_sync_while_fio_writes_the_source(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("fio", "qemu-img")
    with daemon.client() as api:
        api.create_lun("src", SIZE)
    fill(daemon, "src", random_file(tmp_path / "src.raw", 128 * MiB))
    fio = subprocess.Popen(
        [
            "fio",
            "--name=mirror",
            "--ioengine=nbd",
            f"--uri={daemon.uri('src')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            f"--size={SIZE}",
            "--time_based",
            "--runtime=10",
            "--output-format=json",
            f"--output={tmp_path / 'fio.json'}",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: written(daemon, "src") > 128 * MiB + 4 * MiB, what="fio to write")
        before = written(daemon, "src")
        out = lunseal(daemon, "mirror", "create", "src", "dst", "--create-target", "--wait")
        assert out == "mirror dst: synced\n"
        # fio wrote all through the copy and is still writing, now to both sides.
        assert fio.poll() is None, "fio ended before the sync did: make it run longer"
        assert written(daemon, "src") > before
        assert fio.wait(60) == 0, fio.stderr.read().decode() if fio.stderr else ""
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
        if fio.stderr:
            fio.stderr.close()
    job = json.loads((tmp_path / "fio.json").read_text())["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] > 0
    info = status(daemon, "dst")
    assert info["state"] == "synced"
    assert info["bytes_copied"] >= SIZE
    compare(daemon, "src", "dst")


def test_hosts_cannot_write_a_synced_target(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    with daemon.client() as api:
        api.create_lun("src", 16 * MiB)
        api.create_lun("dst", 16 * MiB)
    qemu_io(daemon.uri("src"), "write -P 0x33 0 16M")
    with QemuIoSession(daemon.uri("dst")) as early:  # opened while dst was still writable
        assert "wrote" in early.command("write -P 0x11 0 64k")
        lunseal(daemon, "mirror", "create", "src", "dst", "--wait", "--force")  # dst has data
        for cmd in ("write -P 0x22 0 64k", "write -z 0 64k", "discard 0 64k"):
            assert "Operation not permitted" in early.command(cmd), cmd

    fresh = qemu_io(daemon.uri("dst"), "write -P 0x22 0 4k", check=False)
    assert fresh.returncode != 0
    assert "Permission denied" in fresh.stderr
    assert "wrote" not in fresh.stdout
    qemu_io(daemon.uri("dst"), "read -P 0x33 0 16M", read_only=True)
    compare(daemon, "src", "dst")

    # The source is writable, and its writes reach the target at once.
    qemu_io(daemon.uri("src"), "write -P 0x44 1M 1M")
    qemu_io(daemon.uri("dst"), "read -P 0x44 1M 1M", read_only=True)


def test_split_write_resync_copies_only_what_was_written(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    synced(daemon, tmp_path)
    assert lunseal(daemon, "mirror", "split", "dst") == "mirror dst: split\n"
    # 1 MiB at an offset that is not region-aligned: 17 regions of 64 KiB.
    qemu_io(daemon.uri("src"), "write -P 0x5a 5124k 1M")
    assert compare(daemon, "src", "dst", check=False) == 1
    info = status(daemon, "dst")
    assert (info["source_dirty_regions"], info["target_dirty_regions"]) == (17, 0)

    assert lunseal(daemon, "mirror", "resync", "dst", "--wait") == "mirror dst: synced\n"
    info = status(daemon, "dst")
    assert info["state"] == "synced"
    assert info["bytes_copied"] == 17 * G
    assert info["bytes_copied"] <= MiB + 2 * G  # bounded by the written regions
    compare(daemon, "src", "dst")


def test_resync_overwrites_what_hosts_wrote_on_a_split_target(
    daemon: Daemon, tmp_path: Path
) -> None:
    require_tools("qemu-io", "qemu-img")
    synced(daemon, tmp_path)
    lunseal(daemon, "mirror", "split", "dst", "--target-access", "rw")
    qemu_io(daemon.uri("dst"), "write -P 0x66 10M 256k")  # e.g. a test run on the copy
    qemu_io(daemon.uri("src"), "write -P 0x77 20M 64k")
    lunseal(daemon, "mirror", "resync", "dst", "--wait")
    assert status(daemon, "dst")["bytes_copied"] == 5 * G
    compare(daemon, "src", "dst")


def test_restore_brings_the_source_back_to_the_backup(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    synced(daemon, tmp_path)
    lunseal(daemon, "mirror", "split", "dst")
    backup = tmp_path / "backup.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("dst"), str(backup))
    qemu_io(daemon.uri("src"), "write -P 0xde 0 3M", "write -z 40M 2M", "discard 60M 1M")
    assert compare(daemon, "src", "dst", check=False) == 1

    out = lunseal(daemon, "mirror", "restore", "dst", "--wait")
    assert out == "mirror dst: split\n"
    info = status(daemon, "dst")
    assert info["state"] == "split"
    assert info["bytes_copied"] == 6 * MiB
    compare(daemon, "src", "dst")
    after = tmp_path / "after.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri("dst"), str(after))
    assert sha256(after) == sha256(backup)  # the backup itself was not touched
    qemu_io(daemon.uri("src"), "write -P 0x01 0 4k")  # hosts may write the source again


def test_status_json_fields(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("qemu-io", "qemu-img")
    synced(daemon, tmp_path, size=32 * MiB)
    info = status(daemon, "dst")
    assert info == {
        "id": info["id"],
        "name": "dst",
        "source": "src",
        "target": "dst",
        "state": "synced",
        "percent_done": 100.0,
        "bytes_left": 0,
        "bytes_copied": 32 * MiB,
        "source_dirty_regions": 0,
        "target_dirty_regions": 0,
        "granularity": G,
        "split_at": None,
        "target_access": "ro",
        "reason": "",
    }
    before = time.time()
    lunseal(daemon, "mirror", "split", "dst", "--target-access", "rw")
    qemu_io(daemon.uri("src"), "write -P 1 0 128k")
    qemu_io(daemon.uri("dst"), "write -P 2 1M 64k")
    info = status(daemon, "dst")
    assert info["state"] == "split"
    assert before - 1 <= info["split_at"] <= time.time()
    assert info["target_access"] == "rw"
    assert (info["source_dirty_regions"], info["target_dirty_regions"]) == (2, 1)
    assert info["bytes_left"] == 3 * G
    listed = json.loads(lunseal(daemon, "--json", "mirror", "status"))
    assert [m["name"] for m in listed] == ["dst"]
    assert listed[0] == info
