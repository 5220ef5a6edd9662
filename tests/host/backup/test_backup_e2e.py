"""The host/backup/restore story end to end: real daemon, real ``lunseal`` processes,
data written and compared with qemu-img/qemu-io; and the quiesce/thaw hooks."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import pytest

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
    lunseal_json,
    manifest_files,
    mirror_state,
    restore,
    save,
    write,
)
from tests.support.daemon import LUNSEAL, Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

SIZE = 64 * MiB


def test_backup_overwrite_restore_from_mirror_then_from_archive(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    create_lun(daemon, "app", SIZE)
    fill_random(daemon, "app", tmp_path, 48 * MiB)  # the last 16 MiB stay zero
    taken = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")
    original = save(daemon, "app", tmp_path / "original.raw")
    assert taken["mode"] == "full"
    assert taken["bytes_read"] == SIZE
    assert taken["source"] == "app"
    assert taken["target"] == "app-copy"
    assert taken["stored_chunks"] == 48 * MiB // CHUNK  # zero chunks are not stored
    assert mirror_state(daemon, "app-copy") == "split"
    assert [m["id"] for m in lunseal_json(daemon, archive, "backup", "list")] == [taken["id"]]

    # Data loss on the source; the disk copy's token is untouched: the mirror path.
    write(daemon, "app", 0, 8 * MiB, 0x55)
    write(daemon, "app", 60 * MiB, MiB, 0x66)  # also in a region the backup has as zeros
    assert not equals(daemon, "app", original)
    done = restore(daemon, archive, taken["id"])
    assert done["path"] == "mirror", done
    assert done["to"] == "app"
    assert "the disk copy is intact" in done["reason"]
    assert done["archive_bytes"] == 0
    assert any(step.startswith("verified: LUN app equals backup") for step in done["steps"])
    assert equals(daemon, "app", original)
    assert mirror_state(daemon, "app-copy") == "split"  # the copy can serve another restore

    # A host writes one block into the split copy: its token no longer proves it.
    write(daemon, "app-copy", 20 * MiB, 4096, 0x77)
    write(daemon, "app", 4 * MiB, 2 * MiB, 0x00)
    done = restore(daemon, archive, taken["id"])
    assert done["path"] in ("archive", "hybrid"), done
    assert "the disk copy changed" in done["reason"]
    assert done["archive_bytes"] >= CHUNK
    assert equals(daemon, "app", original)


def test_human_output_names_the_path_and_why(daemon: Daemon, archive: Path) -> None:
    create_lun(daemon, "app", 16 * MiB)
    write(daemon, "app", 0, MiB)
    backup_id = backup(daemon, archive, "app", "app-copy")["id"]
    out = lunseal(daemon, archive, "restore", backup_id).stdout
    assert f"restore backup {backup_id} to LUN app from the mirror: the disk copy is intact" in out
    assert f"verified: LUN app equals backup {backup_id}" in out
    out = lunseal(daemon, archive, "restore", backup_id, "--from", "archive").stdout
    forced = f"restore backup {backup_id} to LUN app from the archive: forced with --from archive"
    assert forced in out


def test_failing_pre_split_hook_aborts_and_leaves_the_mirror_synced(
    daemon: Daemon, archive: Path
) -> None:
    create_lun(daemon, "db", 16 * MiB)
    write(daemon, "db", 0, MiB)
    hook = "echo 'cannot flush the database' >&2; exit 3"
    proc = lunseal(
        daemon, archive, "backup", "create", "db", "--mirror", "db-copy", "--pre-split", hook,
        ok=False,
    )  # fmt: skip
    assert proc.returncode == 9, proc.stderr  # HookFailed
    assert "pre-split hook failed (exit 3)" in proc.stderr
    assert "cannot flush the database" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert mirror_state(daemon, "db-copy") == "synced"  # never split: writes keep being mirrored
    assert manifest_files(archive) == []
    assert lunseal_json(daemon, archive, "backup", "list") == []
    # Synced means synced: a write to the source reaches the copy.
    write(daemon, "db", 2 * MiB, MiB, 0x42)
    assert luns_equal(daemon, "db", "db-copy")
    proc = lunseal(daemon, archive, "backup", "create", "db", "--mirror", "db-copy")
    assert "full" in proc.stdout


def test_hooks_run_around_the_split(daemon: Daemon, archive: Path, tmp_path: Path) -> None:
    """pre-split sees the mirror synced, post-split sees it split, in that order."""
    create_lun(daemon, "db", 16 * MiB)
    write(daemon, "db", 0, MiB)
    seen = tmp_path / "seen"
    status = f"{shlex.quote(LUNSEAL)} --json mirror status db-copy"
    pre = f"{status} > {seen}.pre && echo pre >> {seen}"
    post = f"{status} > {seen}.post && echo post >> {seen} && touch {tmp_path / 'thawed'}"
    taken = backup(
        daemon, archive, "db", "db-copy", "--pre-split", pre, "--post-split", post
    )  # the hooks inherit LUNSEAL_HOME
    assert (tmp_path / "thawed").exists()
    assert seen.read_text().split() == ["pre", "post"]
    assert json.loads(Path(f"{seen}.pre").read_text())[0]["state"] == "synced"
    assert json.loads(Path(f"{seen}.post").read_text())[0]["state"] == "split"
    assert taken["mode"] == "full"


def test_failing_post_split_hook_warns_and_the_backup_completes(
    daemon: Daemon, archive: Path
) -> None:
    create_lun(daemon, "db", 16 * MiB)
    write(daemon, "db", 0, MiB)
    proc = lunseal(
        daemon, archive, "backup", "create", "db", "--mirror", "db-copy",
        "--post-split", "echo thaw failed >&2; exit 1",
    )  # fmt: skip
    assert "warning: post-split hook failed (exit 1)" in proc.stdout
    assert len(manifest_files(archive)) == 1


def test_dry_run_changes_nothing(daemon: Daemon, archive: Path, tmp_path: Path) -> None:
    create_lun(daemon, "app", 32 * MiB)
    fill_random(daemon, "app", tmp_path, 32 * MiB)
    backup_id = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")["id"]
    write(daemon, "app", 0, 4 * MiB, 0x11)
    write(daemon, "app-copy", 8 * MiB, 4096, 0x22)
    before = save(daemon, "app", tmp_path / "before.raw")
    written = bytes_written(daemon, "app"), bytes_written(daemon, "app-copy")
    archive_files = sorted(p.relative_to(archive) for p in archive.rglob("*"))

    plans = {
        "auto": restore(daemon, archive, backup_id, "--dry-run"),
        "archive": restore(daemon, archive, backup_id, "--dry-run", "--from", "archive"),
        "i-know": restore(daemon, archive, backup_id, "--dry-run", "--from", "mirror", "--i-know"),
    }
    assert plans["auto"]["path"] == "hybrid"
    assert plans["auto"]["archive_bytes"] == CHUNK  # the one chunk the host wrote
    assert plans["auto"]["mirror_bytes"] > 0
    assert plans["archive"]["path"] == "archive"
    assert plans["archive"]["archive_bytes"] == 32 * MiB
    assert plans["archive"]["mirror_bytes"] == 0
    assert plans["i-know"]["path"] == "mirror"
    for plan in plans.values():
        assert plan["dry_run"] is True
        assert len(plan["steps"]) == 1  # only the plan: nothing ran
        assert f"the archive {plan['archive_bytes']} bytes" in plan["steps"][0]

    human = lunseal(daemon, archive, "restore", backup_id, "--dry-run").stdout
    assert "from the archive and the mirror" in human
    assert f"the archive {CHUNK} bytes" in human
    assert "verified" not in human

    assert (bytes_written(daemon, "app"), bytes_written(daemon, "app-copy")) == written
    assert equals(daemon, "app", before)
    assert mirror_state(daemon, "app-copy") == "split"
    assert sorted(p.relative_to(archive) for p in archive.rglob("*")) == archive_files
