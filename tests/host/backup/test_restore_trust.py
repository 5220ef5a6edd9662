"""A restore never trusts what it can check: the disk copy is compared with the
backup's digests before it is used (a ``dd`` into its backing file bypasses the
array and its token), what lands on the destination is read back and repaired
from the archive, a different disk under the copy's name is refused, and a LUN
hosts are using is not rewritten without --force."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lunseal.host.archive import Repository
from lunseal.host.backup.common import Log
from lunseal.host.backup.restore import VerifyFailed, plan_restore, run_restore
from tests.host.backup import (
    MiB,
    backup,
    bytes_written,
    create_lun,
    equals,
    fill_random,
    lunseal,
    restore,
    save,
    write,
)
from tests.interop.helpers import QemuIoSession, run
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

SIZE = 16 * MiB


@pytest.fixture
def taken(daemon: Daemon, archive: Path, tmp_path: Path) -> tuple[str, Path]:
    """LUN app with random data backed up through app-copy; (backup id, saved content)."""
    create_lun(daemon, "app", SIZE)
    fill_random(daemon, "app", tmp_path, SIZE)
    backup_id = backup(daemon, archive, "app", "app-copy")["id"]
    return backup_id, save(daemon, "app", tmp_path / "backup.raw")


def copy_file(daemon: Daemon) -> Path:
    with daemon.client() as api:
        return Path(api.show_lun("app-copy").path)


def bypass_write(path: Path, offset: int, length: int) -> None:
    """Write into a backing file behind the array's back, as an admin's dd would."""
    junk = path.with_name("junk.bin")
    junk.write_bytes(os.urandom(length))
    run(
        "dd", f"if={junk}", f"of={path}", "bs=4096", f"seek={offset // 4096}", "conv=notrunc",
        "status=none",
    )  # fmt: skip
    junk.unlink()


def token_intact(daemon: Daemon, archive: Path, backup_id: str) -> bool:
    token = json.loads(lunseal(daemon, archive, "backup", "show", backup_id, "--json").stdout)
    with daemon.client() as api:
        return api.check_token("app-copy", token["token"]).result == "intact"


def check_reason(daemon: Daemon, archive: Path, backup_id: str) -> str:
    token = json.loads(lunseal(daemon, archive, "backup", "show", backup_id, "--json").stdout)
    with daemon.client() as api:
        return api.check_token("app-copy", token["token"]).reason


def test_a_bypass_write_into_the_copy_never_reaches_the_source(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    bypass_write(copy_file(daemon), 5 * MiB + 8192, 4096)  # chunk 5 of the copy
    write(daemon, "app", 5 * MiB, 64 * 1024, 0x11)  # so the reverse resync copies that region
    write(daemon, "app", 9 * MiB, 64 * 1024, 0x12)
    # The array notices this dd (the file's stamp moved), so the token says
    # "changed"; a dd in the same timestamp tick as one of the array's own writes
    # would not be noticed.  Either way the digests decide: force the mirror path
    # as if the token had stayed intact, and the bad chunk must not reach the source.
    assert not token_intact(daemon, archive, backup_id)
    assert "changed by another process" in check_reason(daemon, archive, backup_id)

    done = restore(daemon, archive, backup_id, "--from", "mirror", "--i-know")
    assert done["path"] == "mirror", done
    assert done["mirror_mismatches"] == [5]
    assert done["repaired"] == []
    assert any(
        "the disk copy differs from backup" in s
        and f"chunk 5 (bytes {5 * MiB}-{6 * MiB - 1}); taken from the archive" in s
        for s in done["steps"]
    ), done["steps"]
    assert f"verified: LUN app equals backup {backup_id} (16 chunks)" in done["steps"]
    assert equals(daemon, "app", saved)


def test_verify_mirror_full_checks_chunks_the_resync_would_not_copy(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    backup_id, saved = taken
    bypass_write(copy_file(daemon), 12 * MiB, 4096)  # a region nobody wrote through the array
    write(daemon, "app", 0, 64 * 1024, 0x11)
    # The dd is noticed (the token changed); take the mirror path regardless, as
    # for a dd the stamp could not show (see the test above).
    mirror = ("--from", "mirror", "--i-know")
    assert restore(daemon, archive, backup_id, *mirror)["mirror_mismatches"] == []  # unseen
    write(daemon, "app", 0, 64 * 1024, 0x11)
    done = restore(daemon, archive, backup_id, *mirror, "--verify-mirror", "full")
    assert done["mirror_mismatches"] == [12]
    assert equals(daemon, "app", saved)
    bad = lunseal(daemon, archive, "restore", backup_id, "--verify-mirror", "most", ok=False)
    assert bad.returncode == 2
    assert "--verify-mirror takes copied or full" in bad.stderr


def test_a_copy_altered_after_its_check_is_repaired_from_the_archive(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    """Time of check, time of use: the dd comes after the copy was checked and
    before the reverse resync reads it.  The destination is read back and the
    chunk that landed wrong is rewritten from the archive."""
    backup_id, saved = taken
    write(daemon, "app", 3 * MiB, 64 * 1024, 0x11)
    path = copy_file(daemon)
    struck: list[str] = []

    def progress(what: str, done: int, total: int) -> None:
        if what == "check disk copy" and done >= total and not struck:
            bypass_write(path, 3 * MiB, 4096)
            struck.append(what)

    log = Log(say=lambda m: None)
    with daemon.client() as api:
        repo = Repository.open_local(archive)
        plan = plan_restore(api, repo, backup_id)
        run_restore(api, repo, plan, log=log, progress=progress)
    assert struck
    assert (plan.mirror_mismatches, plan.repaired) == ([], [3])
    assert any("1 chunk(s) landed on app different from backup" in s for s in log.steps)
    assert equals(daemon, "app", saved)


def test_a_different_disk_under_the_copys_name_is_refused(
    daemon: Daemon, archive: Path, taken: tuple[str, Path], tmp_path: Path
) -> None:
    backup_id, _ = taken
    lunseal(daemon, archive, "mirror", "delete", "app-copy")
    lunseal(daemon, archive, "lun", "delete", "app-copy")
    lunseal(daemon, archive, "mirror", "create", "app", "app-copy", "--create-target", "--wait")
    lunseal(daemon, archive, "mirror", "split", "app-copy")
    write(daemon, "app", 0, MiB, 0x21)
    now = save(daemon, "app", tmp_path / "now.raw")
    written = bytes_written(daemon, "app")

    proc = lunseal(daemon, archive, "restore", backup_id, "--from", "mirror", "--i-know", ok=False)
    assert proc.returncode == 4, proc.stderr
    assert f"LUN app-copy is not the disk copy of backup {backup_id}" in proc.stderr
    assert bytes_written(daemon, "app") == written
    assert equals(daemon, "app", now)
    # Left to choose, the restore takes the archive and gives the backup.
    done = restore(daemon, archive, backup_id)
    assert done["path"] == "archive", done
    assert "is not the disk copy" in done["reason"]


@pytest.mark.parametrize("source", ["auto", "archive"])
def test_a_lun_hosts_use_is_not_rewritten_without_force(
    daemon: Daemon, archive: Path, taken: tuple[str, Path], tmp_path: Path, source: str
) -> None:
    backup_id, saved = taken
    write(daemon, "app", 0, MiB, 0x31)
    now = save(daemon, "app", tmp_path / "now.raw")
    extra = [] if source == "auto" else ["--from", source]
    with QemuIoSession(daemon.uri("app")) as host:
        proc = lunseal(daemon, archive, "restore", backup_id, *extra, ok=False)
        assert proc.returncode == 4, proc.stderr
        assert "LUN app is in use by 1 host connection(s) (unix pid " in proc.stderr
        assert "--force" in proc.stderr
        assert equals(daemon, "app", now)
        done = restore(daemon, archive, backup_id, *extra, "--force")
        assert done["steps"][-1].startswith("verified: LUN app equals backup")
        host.command("read 0 4096")  # the host is still served
    assert equals(daemon, "app", saved)


def test_a_chunk_that_stays_wrong_fails_the_restore(
    daemon: Daemon, archive: Path, taken: tuple[str, Path]
) -> None:
    """If even the chunk rewritten from the archive reads back wrong (here: the
    destination's own file is written behind the array's back right after), the
    restore fails naming it; it never reports success with the wrong data."""
    backup_id, _ = taken
    write(daemon, "app", 3 * MiB, 64 * 1024, 0x11)
    with daemon.client() as api:
        copy, dest = Path(api.show_lun("app-copy").path), Path(api.show_lun("app").path)
    struck: list[str] = []

    def progress(what: str, done: int, total: int) -> None:
        if done < total:
            return
        if what == "check disk copy" and not struck:
            bypass_write(copy, 3 * MiB, 4096)  # lands on app through the reverse resync
            struck.append(what)
        elif what == "restore app" and struck == ["check disk copy"]:
            bypass_write(dest, 3 * MiB, 4096)  # and again after the repair
            struck.append(what)

    log = Log(say=lambda m: None)
    with daemon.client() as api:
        repo = Repository.open_local(archive)
        plan = plan_restore(api, repo, backup_id)
        with pytest.raises(VerifyFailed) as failed:
            run_restore(api, repo, plan, log=log, progress=progress)
    assert struck == ["check disk copy", "restore app"]
    assert failed.value.exit_code != 0
    assert "LUN app differs from backup" in failed.value.message
    assert f"chunk 3 (bytes {3 * MiB}-{4 * MiB - 1})" in failed.value.message
    assert not any(s.startswith("verified:") for s in log.steps)
