"""The typed backup record: what a backup writes, restore reads back, and a manifest
without one stops a restore with one clear line before anything is touched."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.errors import ArchiveCorrupt, InvalidArgument
from lunseal.host.archive import Repository
from lunseal.host.backup.record import BackupMode, BackupRecord
from lunseal.host.backup.restore import RestorePath, plan_restore
from lunseal.host.client import ArrayClient

CS = 64 << 10

RECORD = BackupRecord(
    source="app",
    source_uuid="u-app",
    mirror="app-copy",
    target="app-copy",
    target_uuid="u-copy",
    token="lst1.u-copy.00000000000000a7.counter.3",
    hold="backup-0123456789ab",
    parent=None,
    mode=BackupMode.FULL,
    reason="no earlier backup",
)


@pytest.fixture
def repo(tmp_path: Path) -> Repository:
    return Repository.open_local(tmp_path / "archive", chunk_size=CS)


@pytest.fixture
def nowhere() -> Iterator[ArrayClient]:
    """A client of a loopback port nothing listens on: any API call fails."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    api = ArrayClient(f"http://127.0.0.1:{port}", "t", timeout=2.0)
    yield api
    api.close()


def commit(repo: Repository, meta: dict[str, object]) -> str:
    with repo.begin_backup(meta, CS) as writer:
        writer.add_chunk(0, b"\1" * CS)
        return writer.commit().id


def test_the_record_round_trips_through_the_archive_as_plain_json(repo: Repository) -> None:
    backup_id = commit(repo, RECORD.to_meta())
    manifest = repo.manifest(backup_id)
    assert manifest.meta["mode"] == "full"  # the same string the archive always held
    got = BackupRecord.of(manifest)
    assert got == RECORD
    assert isinstance(got.mode, BackupMode)


@pytest.mark.parametrize(
    "meta",
    [{"source": "app"}, {**RECORD.to_meta(), "mode": "sideways"}, {**RECORD.to_meta(), "token": 7}],
    ids=["not-a-backup", "bad-mode", "bad-type"],
)
def test_a_manifest_without_a_usable_record_stops_restore_in_one_line(
    repo: Repository, nowhere: ArrayClient, meta: dict[str, object]
) -> None:
    backup_id = commit(repo, meta)
    with pytest.raises(ArchiveCorrupt, match=f"backup {backup_id} has no usable backup record"):
        plan_restore(nowhere, repo, backup_id)


def test_an_unknown_forced_source_is_refused_not_ignored(
    repo: Repository, nowhere: ArrayClient
) -> None:
    backup_id = commit(repo, RECORD.to_meta())
    with pytest.raises(InvalidArgument, match="--from takes archive or mirror"):
        plan_restore(nowhere, repo, backup_id, force_from="mirrors")
    with pytest.raises(InvalidArgument, match="--verify-mirror takes copied or full"):
        plan_restore(nowhere, repo, backup_id, verify_mirror="some")
    assert RestorePath("archive") is RestorePath.ARCHIVE
