"""Which path a restore takes and why: mirror, hybrid or archive; forced
sources; another destination LUN.  Every restore is checked against the
content saved at backup time with qemu-img compare."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lunseal.host.archive import Repository
from lunseal.host.backup.restore import plan_restore
from tests.host.backup import (
    CHUNK,
    MiB,
    backup,
    bytes_written,
    create_lun,
    equals,
    fill_random,
    luns_equal,
    lunseal,
    mirror_state,
    restore,
    save,
    write,
)
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

SIZE = 32 * MiB


@pytest.fixture
def taken(daemon: Daemon, archive: Path, tmp_path: Path) -> tuple[str, Path]:
    """LUN app with random data (the last 8 MiB zero), backed up through app-copy,
    whose hosts may write (--target-access rw); (backup id, saved content)."""
    create_lun(daemon, "app", SIZE)
    fill_random(daemon, "app", tmp_path, 24 * MiB)
    backup_id = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")["id"]
    return backup_id, save(daemon, "app", tmp_path / "backup.raw")


def test_intact_copy_restores_from_the_mirror_again_and_again(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    for n in range(3):
        write(daemon, "app", n * 5 * MiB, 3 * MiB, 0x30 + n)
        done = restore(daemon, archive, backup_id)
        assert done["path"] == "mirror", done
        assert done["archive_bytes"] == 0
        # Only the reverse resync's regions move: what the host wrote since.
        assert 3 * MiB <= done["mirror_bytes"] <= 3 * MiB + 2 * 64 * 1024
        assert equals(daemon, "app", saved)
        assert mirror_state(daemon, "app-copy") == "split"


def test_one_block_written_to_the_copy_takes_the_hybrid_path(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    write(daemon, "app-copy", 9 * MiB, 4096, 0x77)  # in chunk 2
    write(daemon, "app", 0, 16 * MiB, 0x00)
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "hybrid", done
    assert "names 1 altered chunk(s)" in done["reason"]
    assert done["archive_bytes"] == CHUNK
    assert "wrote 1 chunk(s) from the archive to app" in done["steps"]
    assert equals(daemon, "app", saved)
    # The copy itself still holds the stray write: the next restore is hybrid again.
    assert not equals(daemon, "app-copy", saved)
    write(daemon, "app", 20 * MiB, MiB, 0x01)
    assert restore(daemon, archive, backup_id)["path"] == "hybrid"
    assert equals(daemon, "app", saved)


def test_write_into_a_zero_region_of_the_copy(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    """The altered chunk is all zeros in the backup: the archive supplies zeros."""
    backup_id, saved = taken
    write(daemon, "app-copy", 30 * MiB, 64 * 1024, 0x99)
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "hybrid"
    assert equals(daemon, "app", saved)


def test_copy_changed_without_change_map_restores_from_the_archive(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    """The backup's hold is gone (released by hand): no map says what changed."""
    backup_id, saved = taken
    hold = lunseal(daemon, archive, "backup", "show", backup_id, "--json").stdout
    hold_name = json.loads(hold)["hold"]
    lunseal(daemon, archive, "state", "disable", "app-copy", "--hold", hold_name)
    write(daemon, "app", 0, 4 * MiB, 0x12)
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "archive", done
    assert "the disk copy changed" in done["reason"]
    assert done["archive_bytes"] == 24 * MiB  # zero chunks are written as zeros, not read
    assert equals(daemon, "app", saved)


def test_mirror_resynced_since_the_backup_restores_from_the_archive(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    write(daemon, "app", 0, 4 * MiB, 0x12)
    lunseal(daemon, archive, "mirror", "resync", "app-copy", "--wait")
    assert mirror_state(daemon, "app-copy") == "synced"
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "archive", done
    assert equals(daemon, "app", saved)
    assert luns_equal(daemon, "app", "app-copy")  # synced: the restore reached the copy too


def test_deleted_mirror_restores_from_the_archive(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    lunseal(daemon, archive, "mirror", "delete", "app-copy")
    write(daemon, "app", 0, 4 * MiB, 0x12)
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "archive", done
    assert equals(daemon, "app", saved)


def test_restore_to_another_lun(
    daemon: Daemon, archive: Path, taken: tuple[str, Path], tmp_path: Path
) -> None:
    backup_id, saved = taken
    create_lun(daemon, "other", SIZE)
    fill_random(daemon, "other", tmp_path, SIZE)  # junk everywhere, zero chunks included
    write(daemon, "app", 0, MiB, 0x44)
    source_now = save(daemon, "app", tmp_path / "app-now.raw")
    written = bytes_written(daemon, "app")

    done = restore(daemon, archive, backup_id, "--to", "other")
    assert (done["path"], done["to"]) == ("mirror", "other")
    assert done["mirror_bytes"] == SIZE  # another LUN gets the whole disk copy
    assert equals(daemon, "other", saved)

    fill_random(daemon, "other", tmp_path, SIZE)
    done = restore(daemon, archive, backup_id, "--to", "other", "--from", "archive")
    assert (done["path"], done["to"]) == ("archive", "other")
    assert equals(daemon, "other", saved)

    write(daemon, "app-copy", 0, 4096, 0x55)
    fill_random(daemon, "other", tmp_path, SIZE)
    done = restore(daemon, archive, backup_id, "--to", "other")
    assert (done["path"], done["to"]) == ("hybrid", "other")
    assert equals(daemon, "other", saved)

    # The source was never touched.
    assert bytes_written(daemon, "app") == written
    assert equals(daemon, "app", source_now)


@pytest.mark.parametrize("source", ["auto", "archive", "mirror"])
def test_restore_to_a_smaller_lun_is_refused_before_writing(
    daemon: Daemon, archive: Path, taken: tuple[str, Path], source: str
) -> None:
    backup_id, _ = taken
    create_lun(daemon, "small", 8 * MiB)
    force = [] if source == "auto" else ["--from", source]
    for dry_run in (["--dry-run"], []):
        proc = lunseal(
            daemon, archive, "restore", backup_id, "--to", "small", *force, *dry_run, ok=False
        )
        assert proc.returncode == 4, proc.stderr  # Conflict
        assert f"LUN small is {8 * MiB} bytes; backup {backup_id} needs {SIZE}" in proc.stderr
    assert bytes_written(daemon, "small") == 0
    proc = lunseal(daemon, archive, "restore", backup_id, "--to", "nosuchlun", ok=False)
    assert proc.returncode == 3, proc.stderr  # NotFound
    assert "nosuchlun" in proc.stderr


def test_from_mirror_on_a_changed_copy_needs_i_know(
    daemon: Daemon, archive: Path, taken: tuple[str, Path], tmp_path: Path
) -> None:
    backup_id, saved = taken
    write(daemon, "app-copy", 4 * MiB, 4096, 0x77)
    write(daemon, "app", 0, 2 * MiB, 0x10)
    source_now = save(daemon, "app", tmp_path / "app-now.raw")
    written = bytes_written(daemon, "app")

    proc = lunseal(daemon, archive, "restore", backup_id, "--from", "mirror", ok=False)
    assert proc.returncode == 4, proc.stderr  # Conflict
    assert "--i-know" in proc.stderr
    assert f"the disk copy changed since backup {backup_id}" in proc.stderr
    assert bytes_written(daemon, "app") == written
    assert equals(daemon, "app", source_now)

    done = restore(daemon, archive, backup_id, "--from", "mirror", "--i-know")
    assert done["path"] == "mirror"
    assert "forced with --from mirror" in done["reason"]
    # The disk copy is checked before it is used: the stray write's chunk comes
    # from the archive, so even a forced restore gives exactly the backup.
    assert done["mirror_mismatches"] == [4]
    assert equals(daemon, "app", saved)
    assert not luns_equal(daemon, "app", "app-copy")


def test_from_archive_forced_on_an_intact_copy(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    write(daemon, "app", 0, SIZE, 0x3C)  # zero chunks of the backup too
    copy_written = bytes_written(daemon, "app-copy")
    done = restore(daemon, archive, backup_id, "--from", "archive")
    assert done["path"] == "archive"
    assert done["reason"] == "forced with --from archive"
    assert (done["mirror_bytes"], done["archive_bytes"]) == (0, 24 * MiB)
    assert equals(daemon, "app", saved)
    assert bytes_written(daemon, "app-copy") == copy_written  # the copy was not used
    # The copy is still intact: the next restore goes back to the mirror.
    assert restore(daemon, archive, backup_id, "--dry-run")["path"] == "mirror"


def test_plan_restore_api(daemon: Daemon, archive: Path, taken: tuple[str, Path]) -> None:
    """The library API the CLI uses gives the same plans."""
    backup_id, _ = taken
    repo = Repository.open_local(archive, create=False)
    with daemon.client() as api:
        assert plan_restore(api, repo, backup_id).path == "mirror"
        write(daemon, "app-copy", 0, 4096)
        plan = plan_restore(api, repo, backup_id)
        assert (plan.path, plan.archive_chunks, plan.archive_bytes) == ("hybrid", [0], CHUNK)
        assert plan.dest == "app"
        forced = plan_restore(api, repo, backup_id, force_from="archive", to="app-copy")
        assert (forced.path, forced.dest) == ("archive", "app-copy")
        assert forced.archive_chunks == list(range(SIZE // CHUNK))
