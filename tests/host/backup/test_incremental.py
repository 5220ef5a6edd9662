"""Incremental backups read only what the target's change map names, fall back
to a full read loudly when the map cannot be trusted, and every backup of a
series restores to exactly its own content."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from lunseal.host.archive import Repository
from lunseal.host.backup.common import Log, no_progress
from lunseal.host.backup.create import create_backup
from tests.host.backup import (
    CHUNK,
    MiB,
    backup,
    create_lun,
    equals,
    fill_random,
    lunseal,
    lunseal_json,
    restore,
    save,
    write,
)
from tests.interop.helpers import qemu_io
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

KiB = 1 << 10


def read_bound(extents: list[tuple[int, int]]) -> int:
    """The most an incremental may read for these writes: the changed bytes rounded
    up to whole chunks, plus one chunk per extent (an extent may straddle two)."""
    changed = sum(length for _, length in extents)
    return -(-changed // CHUNK) * CHUNK + len(extents) * CHUNK


def touched_chunks(extents: list[tuple[int, int]]) -> set[int]:
    return {i for off, n in extents for i in range(off // CHUNK, (off + n - 1) // CHUNK + 1)}


def test_one_percent_changed_reads_about_one_percent(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    size = 256 * MiB
    create_lun(daemon, "vol", size)
    fill_random(daemon, "vol", tmp_path, size)
    full = backup(daemon, archive, "vol", "vol-copy")
    assert (full["mode"], full["bytes_read"]) == ("full", size)
    assert full["reason"] == "no earlier backup of vol on vol-copy: full read"

    extents = [
        (10 * MiB + 4 * KiB, MiB),  # inside one chunk, not aligned
        (100 * MiB - 512 * KiB, MiB),  # straddles a chunk boundary
        (200 * MiB, 512 * KiB),
        (size - 64 * KiB, 64 * KiB),  # the very end
    ]
    for n, (offset, length) in enumerate(extents):
        write(daemon, "vol", offset, length, 0x61 + n)
    changed = sum(length for _, length in extents)
    assert size // 200 < changed < size // 50  # about 1%
    expected = save(daemon, "vol", tmp_path / "after.raw")

    inc = backup(daemon, archive, "vol", "vol-copy")
    assert inc["mode"] == "incremental", inc
    assert inc["reason"] == f"mirror unchanged since backup {full['id']}: incremental"
    assert inc["parent"] == full["id"]
    assert len(touched_chunks(extents)) * CHUNK <= inc["bytes_read"] <= read_bound(extents)
    assert inc["bytes_read"] <= size // 10  # whole chunks: 5 of 64
    # The other chunks are the parent's: nothing else was stored.
    assert inc["stored_chunks"] == full["stored_chunks"] == size // CHUNK

    write(daemon, "vol", 0, size, 0x00)  # lose everything, then restore from the archive
    done = restore(daemon, archive, inc["id"], "--from", "archive")
    assert done["path"] == "archive"
    assert equals(daemon, "vol", expected)


def test_series_each_backup_restores_its_own_content(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    size = 64 * MiB
    create_lun(daemon, "vol", size)
    create_lun(daemon, "scratch", size)
    fill_random(daemon, "vol", tmp_path, 40 * MiB)
    changes: list[Callable[[], object]] = [
        lambda: write(daemon, "vol", 5 * MiB, 3 * MiB, 0x21),
        lambda: qemu_io(daemon.uri("vol"), f"write -z {12 * MiB} {5 * MiB}"),  # zeroes
        lambda: write(daemon, "vol", 50 * MiB, 6 * MiB, 0x23),  # into the zero region
        lambda: qemu_io(daemon.uri("vol"), f"discard {0} {4 * MiB}"),
    ]
    series: list[tuple[str, Path]] = []
    modes: list[str] = []
    for n in range(len(changes) + 1):
        if n:
            changes[n - 1]()
        taken = backup(daemon, archive, "vol", "vol-copy")
        modes.append(taken["mode"])
        assert taken["parent"] == (series[-1][0] if series else None)
        series.append((taken["id"], save(daemon, "vol", tmp_path / f"backup-{n}.raw")))
    assert modes == ["full"] + ["incremental"] * len(changes)
    listed = lunseal_json(daemon, archive, "backup", "list")
    assert [m["id"] for m in listed] == [backup_id for backup_id, _ in series]
    contents = [image.read_bytes() for _, image in series]
    assert len(set(contents)) == len(contents)  # each backup is different

    # Oldest first to the source itself, the rest to a scratch LUN.
    backup_id, image = series[0]
    assert restore(daemon, archive, backup_id, "--from", "archive")["path"] == "archive"
    assert equals(daemon, "vol", image)
    for backup_id, image in series[1:]:
        fill_random(daemon, "scratch", tmp_path, size)
        done = restore(daemon, archive, backup_id, "--from", "archive", "--to", "scratch")
        assert done["path"] == "archive"
        assert equals(daemon, "scratch", image), backup_id
    # And back on the source, newest then oldest again.
    for backup_id, image in (series[-1], series[0]):
        restore(daemon, archive, backup_id, "--from", "archive")
        assert equals(daemon, "vol", image), backup_id


def test_altered_target_forces_a_loud_full_read(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    size = 32 * MiB
    create_lun(daemon, "vol", size)
    fill_random(daemon, "vol", tmp_path, size)
    first = backup(daemon, archive, "vol", "vol-copy", "--target-access", "rw")
    write(daemon, "vol-copy", 8 * MiB, 4 * KiB, 0x7E)  # a host writes into the split copy
    write(daemon, "vol", 0, MiB, 0x11)

    second = backup(daemon, archive, "vol", "vol-copy")
    loud = f"mirror was altered since backup {first['id']}: full read"
    assert any(step.startswith(loud) for step in second["steps"]), second["steps"]
    assert second["mode"] == "full"
    assert second["reason"].startswith(f"mirror was altered since backup {first['id']}: full read")
    assert second["bytes_read"] == size
    expected = save(daemon, "vol", tmp_path / "second.raw")

    # Untouched since: incremental again, and nothing changed, so nothing is read.
    third = backup(daemon, archive, "vol", "vol-copy")
    assert third["mode"] == "incremental"
    assert third["bytes_read"] == 0
    assert third["parent"] == second["id"]
    write(daemon, "vol", 0, size, 0x00)
    restore(daemon, archive, third["id"], "--from", "archive")
    assert equals(daemon, "vol", expected)


def test_lost_change_map_forces_a_loud_full_read(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    """The backup's hold was released (another hold keeps tracking on, so the
    token stays valid): without its map the next backup reads everything."""
    size = 16 * MiB
    create_lun(daemon, "vol", size)
    fill_random(daemon, "vol", tmp_path, size)
    first = backup(daemon, archive, "vol", "vol-copy")
    lunseal(daemon, archive, "state", "enable", "vol-copy", "--hold", "someone-else")
    lunseal(daemon, archive, "state", "disable", "vol-copy", "--hold", first["hold"])
    second = backup(daemon, archive, "vol", "vol-copy")
    assert second["mode"] == "full"
    assert second["reason"] == f"the change map of backup {first['id']} is gone: full read"
    assert second["bytes_read"] == size


def test_create_backup_api_result(daemon: Daemon, archive: Path, tmp_path: Path) -> None:
    """BackupResult from the library: mode, reason and bytes read match the manifest."""
    size = 16 * MiB
    create_lun(daemon, "vol", size)
    fill_random(daemon, "vol", tmp_path, size)
    repo = Repository.open_local(archive)
    said: list[str] = []
    with daemon.client() as api:
        full = create_backup(
            api, repo, "vol", "vol-copy", log=Log(say=said.append), progress=no_progress
        )
        write(daemon, "vol", 6 * MiB, 100 * KiB)
        inc = create_backup(
            api, repo, "vol", "vol-copy", log=Log(say=said.append), progress=no_progress
        )
    assert (full.mode, full.bytes_read) == ("full", size)
    assert (inc.mode, inc.bytes_read) == ("incremental", CHUNK)
    assert inc.reason == f"mirror unchanged since backup {full.manifest.id}: incremental"
    assert inc.manifest.meta["bytes_read"] == CHUNK
    changed = 6 * MiB // CHUNK
    assert inc.manifest.chunks[0] == full.manifest.chunks[0]
    assert inc.manifest.chunks[changed] != full.manifest.chunks[changed]
    assert json.loads(json.dumps(inc.manifest.meta))["parent"] == full.manifest.id
    assert any(line.startswith(f"backup {inc.manifest.id}: incremental") for line in said)
