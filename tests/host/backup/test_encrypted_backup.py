"""Backup and restore through an encrypted archive with the real CLI and daemon:
incrementals and dedup still work, and the issue's attack (attacker data in a
chunk with a re-sealed manifest) is refused by check and restore."""

from __future__ import annotations

import json
from pathlib import Path

import blake3
import pytest
import zstandard

from lunseal.host.archive import Manifest
from lunseal.host.archive.repository import _CHUNK_HEADER, _CHUNK_MAGIC
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
from tests.support.daemon import Daemon

pytestmark = [pytest.mark.daemon, pytest.mark.interop]

SIZE = 8 * MiB


@pytest.fixture(autouse=True)
def passphrase(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The helpers pass os.environ on to the lunseal processes."""
    monkeypatch.setenv("LUNSEAL_PASSPHRASE", "tape in the vault")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


def forge(archive: Path, backup_id: str, like: dict[str, object], data: bytes) -> None:
    """What the issue did to an unencrypted archive: attacker data as a chunk and a
    manifest re-sealed around it, written in place of backup ``backup_id``."""
    digest = blake3.blake3(data).hexdigest()
    body = zstandard.ZstdCompressor().compress(data)
    path = archive / "chunks" / digest[:2] / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_CHUNK_HEADER.pack(_CHUNK_MAGIC, 1, len(data)) + body)
    meta = {k: v for k, v in like.items() if k not in ("id", "created_at", "size", "chunks")}
    meta = {k: v for k, v in meta.items() if k not in ("chunk_size", "stored_chunks", "digest")}
    meta.pop("steps", None)
    manifest = Manifest(
        id=backup_id,
        created_at=str(like["created_at"]),
        size=SIZE,
        chunk_size=CHUNK,
        chunks=[digest] * (SIZE // CHUNK),
        meta=meta,
    ).sealed()
    (archive / "manifests" / f"{backup_id}.json").write_bytes(manifest.to_json())


def test_encrypted_series_and_the_forged_backup(
    daemon: Daemon, archive: Path, tmp_path: Path
) -> None:
    init = lunseal(daemon, archive, "archive", "init", str(archive), "--encryption", "repokey")
    assert "Without the key AND the passphrase" in init.stderr
    create_lun(daemon, "app", SIZE)
    fill_random(daemon, "app", tmp_path, SIZE)
    a = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")
    saved_a = save(daemon, "app", tmp_path / "a.raw")
    write(daemon, "app", 5 * CHUNK, 4096, 0x42)
    b = backup(daemon, archive, "app", "app-copy", "--target-access", "rw")
    assert (b["mode"], b["bytes_read"]) == ("incremental", CHUNK)  # one chunk changed
    assert len(chunk_files(archive)) == SIZE // CHUNK + 1  # the rest is shared
    for path in manifest_files(archive):
        assert b'"source"' not in path.read_bytes()  # sealed: nothing readable
    assert lunseal_json(daemon, archive, "archive", "check", "--read-data")["ok"] is True

    # Someone with write access to the archive puts their data in B's place.
    forge(archive, b["id"], b, b"attacker" * (CHUNK // 8))
    proc = lunseal(daemon, archive, "archive", "check", "--read-data", ok=False)
    assert proc.returncode == 1
    assert f"backup {b['id']}: manifest not an encrypted lunseal object" in proc.stdout
    assert "archive DAMAGED" in proc.stdout
    write(daemon, "app", 0, SIZE, 0x00)  # the source lost its data
    before = bytes_written(daemon, "app")
    proc = lunseal(daemon, archive, "restore", b["id"], "--from", "archive", ok=False)
    assert proc.returncode == 8, proc.stderr
    assert f"backup {b['id']}: manifest" in proc.stderr
    assert bytes_written(daemon, "app") == before  # nothing was written

    # The untouched backup still restores from the archive, verified.
    done = restore(daemon, archive, a["id"], "--from", "archive")
    assert done["path"] == "archive"
    assert equals(daemon, "app", saved_a)


def test_wrong_passphrase_and_passphrase_file(
    daemon: Daemon, archive: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lunseal(daemon, archive, "archive", "init", str(archive), "--encryption", "keyfile")
    create_lun(daemon, "db", SIZE)
    fill_random(daemon, "db", tmp_path, SIZE)
    taken = backup(daemon, archive, "db", "db-copy")
    monkeypatch.setenv("LUNSEAL_PASSPHRASE", "not it")
    proc = lunseal(daemon, archive, "backup", "list", ok=False)
    assert proc.returncode == 7
    assert "wrong passphrase" in proc.stderr
    monkeypatch.delenv("LUNSEAL_PASSPHRASE")
    proc = lunseal(daemon, archive, "backup", "verify", taken["id"], ok=False)
    assert "archive is encrypted: set LUNSEAL_PASSPHRASE" in proc.stderr
    secret = tmp_path / "pass"
    secret.write_text("tape in the vault\n")
    listed = lunseal(daemon, archive, "--json", "backup", "list", "--passphrase-file", str(secret))
    assert [m["id"] for m in json.loads(listed.stdout)] == [taken["id"]]

    # The disk copy is checked against the keyed ids before it is trusted.
    saved = save(daemon, "db", tmp_path / "db.raw")
    write(daemon, "db", 0, SIZE, 0x00)
    done = lunseal_json(
        daemon, archive, "restore", taken["id"], "--verify-mirror", "full",
        "--passphrase-file", str(secret),
    )  # fmt: skip
    assert (done["path"], done["mirror_mismatches"], done["repaired"]) == ("mirror", [], [])
    assert equals(daemon, "db", saved)
