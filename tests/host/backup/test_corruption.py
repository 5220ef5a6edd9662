"""A damaged archive is found and named, never restored from; a killed backup
leaves the archive consistent and the next backup works."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lunseal.host.nbd_client import NbdClient
from tests.host.backup import (
    CHUNK,
    MiB,
    backup,
    bytes_written,
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

SIZE = 32 * MiB


def flip_bit(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))


def two_backups(daemon: Daemon, archive: Path, tmp_path: Path) -> tuple[str, str, Path]:
    """Backups A and B of LUN app differing only in chunk 5; (A, B, A's content)."""
    create_lun(daemon, "app", SIZE)
    fill_random(daemon, "app", tmp_path, SIZE)
    a = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")["id"]
    saved = save(daemon, "app", tmp_path / "a.raw")
    write(daemon, "app", 5 * CHUNK, 4096, 0x42)
    b = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")["id"]
    return a, b, saved


def chunk_of(archive: Path, backup_id: str, index: int) -> Path:
    manifest = json.loads((archive / "manifests" / f"{backup_id}.json").read_text())
    digest = str(manifest["chunks"][index])
    return archive / "chunks" / digest[:2] / digest


def test_flipped_bit_is_found_named_and_never_restored(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    a, b, saved_a = two_backups(daemon, archive, tmp_path)
    assert lunseal_json(daemon, archive, "archive", "check", "--read-data")["ok"] is True
    shared = chunk_of(archive, a, 2)  # chunk 2 is the same in A and B
    assert shared == chunk_of(archive, b, 2)
    flip_bit(shared, shared.stat().st_size // 2)
    digest = shared.name

    # Without --read-data only presence is checked: the damage is not visible yet.
    assert lunseal(daemon, archive, "archive", "check").returncode == 0
    proc = lunseal(daemon, archive, "archive", "check", "--read-data", ok=False)
    assert proc.returncode == 1
    assert f"chunk {digest}: digest mismatch" in proc.stdout
    assert f"affects {a}, {b}" in proc.stdout  # oldest first
    assert f"archive DAMAGED: affects {', '.join(sorted([a, b]))}" in proc.stdout
    proc = lunseal(daemon, archive, "archive", "check", str(archive), "--read-data", "--json",
                   ok=False)  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["ok"] is False
    assert report["affected"] == sorted([a, b])
    assert any(digest in line for line in report["problems"])

    for backup_id in (a, b):
        proc = lunseal(daemon, archive, "backup", "verify", backup_id, ok=False)
        assert proc.returncode == 8, proc.stderr  # ArchiveCorrupt
        assert f"chunk {digest} is corrupt" in proc.stderr
        assert "Traceback" not in proc.stderr

    # The source lost data: a forced archive restore refuses before writing anything.
    write(daemon, "app", 0, SIZE, 0x00)
    before = save(daemon, "app", tmp_path / "lost.raw")
    written = bytes_written(daemon, "app")
    proc = lunseal(daemon, archive, "restore", a, "--from", "archive", ok=False)
    assert proc.returncode == 8, proc.stderr
    assert f"chunk {digest} is corrupt" in proc.stderr
    assert a in proc.stderr
    assert bytes_written(daemon, "app") == written
    assert equals(daemon, "app", before)

    # Hybrid: the damaged chunk is among those the archive would supply.
    write(daemon, "app-copy", 2 * CHUNK, 4096, 0x33)
    create_lun(daemon, "other", SIZE)
    plan = restore(daemon, archive, b, "--to", "other", "--dry-run")
    assert plan["path"] == "hybrid"
    proc = lunseal(daemon, archive, "restore", b, "--to", "other", ok=False)
    assert f"chunk {digest} is corrupt" in proc.stderr
    assert bytes_written(daemon, "other") == 0

    # Repairing the object (here: the original bytes) makes everything whole again.
    flip_bit(shared, shared.stat().st_size // 2)
    assert lunseal_json(daemon, archive, "archive", "check", "--read-data")["ok"] is True
    restore(daemon, archive, a, "--from", "archive")
    assert equals(daemon, "app", saved_a)


def test_intact_mirror_restores_despite_a_damaged_archive(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    """The mirror path needs no chunk: the disk copy is provably the backup."""
    _, b, _ = two_backups(daemon, archive, tmp_path)
    saved_b = save(daemon, "app", tmp_path / "b.raw")
    for chunk in chunk_files(archive):
        flip_bit(chunk, 20)
    write(daemon, "app", 0, SIZE, 0x00)
    done = restore(daemon, archive, b)
    assert done["path"] == "mirror"
    assert equals(daemon, "app", saved_b)


def test_missing_chunk_is_reported_without_read_data(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    a, b, _ = two_backups(daemon, archive, tmp_path)
    only_b = chunk_of(archive, b, 5)
    assert only_b != chunk_of(archive, a, 5)
    only_b.unlink()
    proc = lunseal(daemon, archive, "archive", "check", ok=False)
    assert f"chunk {only_b.name}: missing; affects {b}" in proc.stdout
    assert a not in proc.stdout
    assert lunseal(daemon, archive, "backup", "verify", a).returncode == 0
    proc = lunseal(daemon, archive, "backup", "verify", b, ok=False)
    assert f"chunk {only_b.name} is missing; affects backups {b}" in proc.stderr


def test_damaged_manifest_is_named_and_does_not_block_backups(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    a, b, _ = two_backups(daemon, archive, tmp_path)
    path = archive / "manifests" / f"{b}.json"
    path.write_text(path.read_text().replace('"mode": "incremental"', '"mode": "full"'))
    proc = lunseal(daemon, archive, "archive", "check", ok=False)
    assert f"backup {b}: manifest digest mismatch (damaged or edited)" in proc.stdout
    assert proc.stdout.splitlines()[-1] == f"archive DAMAGED: affects {b}"
    assert f"backup {b}: backup {b}" not in proc.stdout  # the id is named once
    listed = lunseal(daemon, archive, "--json", "backup", "list")
    assert [m["id"] for m in json.loads(listed.stdout)] == [a]  # the good one is listed
    assert f"warning: backup {b}: manifest digest mismatch" in listed.stderr
    proc = lunseal(daemon, archive, "restore", b, "--from", "archive", ok=False)
    assert proc.returncode == 8
    assert f"backup {b}: manifest digest mismatch" in proc.stderr
    assert lunseal(daemon, archive, "backup", "verify", a).returncode == 0

    # The next backup skips the damaged record, says so, and reads everything.
    write(daemon, "app", 0, MiB, 0x17)
    taken = backup(daemon, archive, "app", "app-copy")
    assert any(step.startswith(f"warning: backup {b}: manifest") for step in taken["steps"])
    assert (taken["mode"], taken["parent"], taken["bytes_read"]) == ("full", a, SIZE)
    expected = save(daemon, "app", tmp_path / "c.raw")
    write(daemon, "app", 0, SIZE, 0x00)
    restore(daemon, archive, taken["id"], "--from", "archive")
    assert equals(daemon, "app", expected)


def test_killed_backup_leaves_the_archive_consistent(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    size = 512 * MiB
    create_lun(daemon, "big", size)
    fill_random(daemon, "big", tmp_path, size)
    env = {**os.environ, "LUNSEAL_HOME": str(daemon.home), "LUNSEAL_ARCHIVE": str(archive)}
    proc = subprocess.Popen(
        [LUNSEAL, "backup", "create", "big", "--mirror", "big-copy"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while len(chunk_files(archive)) < 3:  # streaming has begun
            assert proc.poll() is None, "the backup ended before it could be killed"
            assert time.monotonic() < deadline, "the backup never started streaming"
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    stored = len(chunk_files(archive))
    assert 3 <= stored < size // CHUNK, "killed midway"
    assert manifest_files(archive) == []  # no half backup

    report = lunseal_json(daemon, archive, "archive", "check", "--read-data")
    assert report == {"ok": True, "problems": [], "affected": []}
    assert lunseal_json(daemon, archive, "backup", "list") == []

    with daemon.client() as api:
        stale = [h.name for h in api.list_holds("big-copy")]
    assert len(stale) == 1  # the killed run's hold

    taken = backup(daemon, archive, "big", "big-copy")
    assert taken["mode"] == "full"
    assert taken["bytes_read"] == size
    assert f"released hold {stale[0]} of an earlier backup" in taken["steps"]
    with daemon.client() as api:
        assert [h.name for h in api.list_holds("big-copy")] == [taken["hold"]]
    expected = save(daemon, "big", tmp_path / "big.raw")
    assert lunseal_json(daemon, archive, "archive", "check", "--read-data")["ok"] is True
    write(daemon, "big", 0, 64 * MiB, 0x00)
    restore(daemon, archive, taken["id"], "--from", "archive")
    assert equals(daemon, "big", expected)
    # The killed run's chunks were the same data: all referenced now, none left to prune.
    pruned = lunseal_json(daemon, archive, "backup", "prune", "--keep-last", "1")
    assert (pruned["removed"], pruned["chunks_removed"]) == ([], 0)


def test_copy_written_while_it_is_read_is_not_recorded(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    """A host with rw access writes into the split copy mid-stream: the image read
    would be torn, so the backup refuses to record it."""
    size = 512 * MiB
    create_lun(daemon, "big", size)
    fill_random(daemon, "big", tmp_path, size)
    env = {**os.environ, "LUNSEAL_HOME": str(daemon.home), "LUNSEAL_ARCHIVE": str(archive)}
    proc = subprocess.Popen(
        [LUNSEAL, "backup", "create", "big", "--mirror", "big-copy", "--target-access", "rw"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        with daemon.client() as api:
            while not any(m.name == "big-copy" and m.state == "split" for m in api.list_mirrors()):
                assert proc.poll() is None, "the backup ended before the split"
                assert time.monotonic() < deadline, "never split"
                time.sleep(0.01)
        with NbdClient(daemon.uri("big-copy"), timeout=10) as host:
            while len(chunk_files(archive)) < 2:  # chunk 0 is already read
                assert proc.poll() is None, "the backup ended before it streamed"
                assert time.monotonic() < deadline, "never streamed"
                time.sleep(0.005)
            host.write(0, b"a careless host" * 100)
            host.flush()
        assert proc.poll() is None, "the backup finished before the host wrote"
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    assert proc.returncode == 4, out + err  # Conflict
    assert "the disk copy big-copy changed while it was read" in err
    assert "the backup is not recorded" in err
    assert manifest_files(archive) == []
    assert lunseal_json(daemon, archive, "archive", "check", "--read-data")["ok"] is True

    taken = backup(daemon, archive, "big", "big-copy")  # resyncs the copy, reads it whole
    assert (taken["mode"], taken["bytes_read"]) == ("full", size)
    expected = save(daemon, "big", tmp_path / "big.raw")
    write(daemon, "big", 0, 8 * MiB, 0x00)
    assert restore(daemon, archive, taken["id"])["path"] == "mirror"
    assert equals(daemon, "big", expected)
