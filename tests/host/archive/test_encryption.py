"""Encrypted archives against real files: what an attacker with write access to the
repository (but no key) can do is detected; dedup, incrementals and prune still work."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import blake3
import pytest
import zstandard

from lunseal.errors import ArchiveCorrupt, Conflict, InvalidArgument, NotFound, Unauthorized
from lunseal.host.archive import Manifest, Repository
from lunseal.host.archive.crypto import Kdf, Unlock, default_key_file
from lunseal.host.archive.repository import _CHUNK_HEADER, _CHUNK_MAGIC, chunk_key, manifest_key
from lunseal.host.archive.storage import LocalStorage

CS = 64 * 1024
PASS = "correct horse battery staple"
#: The smallest Argon2id cost: the tests are about the format, not the KDF's strength.
FAST_KDF = {"iterations": 1, "lanes": 1, "memory_kib": 8}


def init(path: Path, mode: str = "repokey", passphrase: str = PASS) -> Repository:
    repo, _ = Repository.init_local(path, mode, Unlock(passphrase), CS, Kdf.new(**FAST_KDF))
    return repo


def reopen(path: Path, passphrase: str | None = PASS, key_file: Path | None = None) -> Repository:
    return Repository.open_local(path, create=False, unlock=Unlock(passphrase, key_file))


def backup(repo: Repository, chunks: list[bytes], **meta: object) -> Manifest:
    with repo.begin_backup(dict(meta), sum(len(c) for c in chunks)) as writer:
        for i, data in enumerate(chunks):
            writer.add_chunk(i, data)
        return writer.commit()


def restore(repo: Repository, m: Manifest) -> bytes:
    return b"".join(repo.read_backup_chunk(m, i) for i in range(len(m.chunks)))


def rand(n: int = CS) -> bytes:
    return os.urandom(n)


def plain_chunk(data: bytes) -> tuple[str, bytes]:
    """What someone without the key can make: an unencrypted chunk object, plain id."""
    body = zstandard.ZstdCompressor().compress(data)
    return blake3.blake3(data).hexdigest(), _CHUNK_HEADER.pack(_CHUNK_MAGIC, 1, len(data)) + body


@pytest.fixture(autouse=True)
def private_state(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Key files and the record of encrypted archives go to the test's own directory."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg-config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))


@pytest.fixture
def arch(tmp_path: Path) -> Path:
    return tmp_path / "archive"


@pytest.fixture
def repo(arch: Path) -> Repository:
    return init(arch)


# -- what works as before -------------------------------------------------------------


def test_roundtrip_dedup_incremental_and_prune(arch: Path, repo: Repository) -> None:
    a, b, c = rand(), rand(), rand(1000)
    first = backup(repo, [a, bytes(CS), a, c], source="app")
    assert first.chunks[0] == first.chunks[2]  # dedup within a backup
    assert first.chunks[1] is None
    repo = reopen(arch)
    assert restore(repo, repo.manifest(first.id)) == a + bytes(CS) + a + c
    with repo.begin_backup({"source": "app"}, 3 * CS + 1000) as w:  # an incremental
        w.reuse_chunk(0, first.chunks[0])
        w.reuse_chunk(1, None)
        w.add_chunk(2, b)
        assert w.add_chunk(3, c) == first.chunks[3]  # dedup across backups
        second = w.commit()
    assert (w.stats.chunks_reused, w.stats.chunks_written, w.stats.chunks_deduplicated) == (2, 1, 1)
    assert restore(repo, repo.manifest(second.id)) == a + bytes(CS) + b + c
    assert repo.check(read_data=True).ok
    report = repo.prune(keep_last=1, keep_daily=None)
    assert report.removed == [first.id]
    assert report.chunks_removed == 0  # the second backup still uses every chunk
    assert restore(repo, repo.manifest(second.id)) == a + bytes(CS) + b + c
    assert repo.check(read_data=True).ok


def test_objects_reveal_neither_data_nor_ids(arch: Path, repo: Repository) -> None:
    marker = b"SECRET-PAYROLL-" * 50
    data = marker + rand(CS - len(marker))
    m = backup(repo, [data], source="payroll-lun")
    digest = m.chunks[0]
    assert digest is not None
    assert digest != blake3.blake3(data).hexdigest()  # keyed: the plain hash says nothing
    for path in arch.rglob("*"):
        if path.is_file() and path.name != ".lock":
            raw = path.read_bytes()
            assert b"SECRET-PAYROLL" not in raw
            if path.parent.name == "manifests":
                assert b"payroll-lun" not in raw
                assert digest.encode() not in raw
    other = init(arch.parent / "other")
    assert backup(other, [data]).chunks[0] != digest  # another archive, another id
    assert m.chunk_id(data) == digest  # what restore uses to check a disk copy


def test_config_names_the_encryption(arch: Path, repo: Repository) -> None:
    config = json.loads((arch / "config").read_bytes())
    assert config["version"] == 2  # older lunseal refuses it instead of writing plaintext
    assert config["encryption"] == "repokey"
    assert repo.key is not None
    assert config["repository"] == repo.key.repository
    assert json.loads((arch / "key").read_bytes())["kdf"]["name"] == "argon2id"


def test_unencrypted_archives_are_unchanged(tmp_path: Path) -> None:
    repo, key_path = Repository.init(LocalStorage(tmp_path), "none", chunk_size=CS)
    assert key_path is None
    assert json.loads((tmp_path / "config").read_bytes())["version"] == 1
    data = rand()
    assert backup(repo, [data]).chunks == [blake3.blake3(data).hexdigest()]


def test_init_refuses_an_existing_archive_and_bad_modes(arch: Path, repo: Repository) -> None:
    with pytest.raises(Conflict, match="already exists"):
        init(arch)
    with pytest.raises(InvalidArgument, match="one of"):
        Repository.init(LocalStorage(arch.parent), "rot13", Unlock(PASS))
    with pytest.raises(InvalidArgument, match="passphrase"):
        Repository.init(LocalStorage(arch.parent), "repokey", Unlock(None))


# -- unlocking ---------------------------------------------------------------------


def test_wrong_or_missing_passphrase(arch: Path, repo: Repository) -> None:
    backup(repo, [rand()])
    with pytest.raises(Unauthorized, match="wrong passphrase"):
        reopen(arch, "guess")
    with pytest.raises(Unauthorized, match="LUNSEAL_PASSPHRASE"):
        reopen(arch, None)


def test_keyfile_mode(arch: Path, tmp_path: Path) -> None:
    repo = init(arch, "keyfile")
    assert repo.key is not None
    default = default_key_file(repo.key.repository)
    assert default.is_file()
    assert default.stat().st_mode & 0o777 == 0o600
    assert not (arch / "key").exists()  # the repository alone cannot be unlocked
    m = backup(repo, [rand()])
    assert reopen(arch).manifest(m.id) == m
    moved = tmp_path / "elsewhere.key"
    default.rename(moved)
    with pytest.raises(Unauthorized, match="does not exist"):
        reopen(arch)
    assert reopen(arch, key_file=moved).manifest(m.id) == m


def test_export_and_import_of_a_lost_key(arch: Path, repo: Repository, tmp_path: Path) -> None:
    m = backup(repo, [rand()])
    exported = reopen(arch).key_blob
    assert exported is not None
    (arch / "key").unlink()
    with pytest.raises(ArchiveCorrupt, match="key object is missing"):
        reopen(arch)
    stranger = init(tmp_path / "stranger").key_blob
    assert stranger is not None
    with pytest.raises(Unauthorized, match="another archive"):
        Repository.import_key(LocalStorage(arch), stranger, Unlock(PASS))
    with pytest.raises(Unauthorized, match="wrong passphrase"):
        Repository.import_key(LocalStorage(arch), exported, Unlock("guess"))
    assert not (arch / "key").exists()
    Repository.import_key(LocalStorage(arch), exported, Unlock(PASS))
    assert reopen(arch).manifest(m.id) == m


def test_key_with_absurd_kdf_parameters_is_refused_before_deriving(
    arch: Path, repo: Repository
) -> None:
    key = json.loads((arch / "key").read_bytes())
    key["kdf"]["memory_kib"] = 1 << 40  # would allocate a petabyte
    (arch / "key").write_text(json.dumps(key))
    with pytest.raises(ArchiveCorrupt, match="memory_kib out of range"):
        reopen(arch)


# -- attacks by someone who can write the repository but has no key ------------------


def forge_backup(arch: Path, data: bytes, like: Manifest) -> str:
    """Store attacker data as a chunk and a correctly "sealed" (plain-digest) manifest,
    as anyone can for an unencrypted archive; returns the forged backup's id."""
    digest, blob = plain_chunk(data)
    path = arch / chunk_key(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(blob)
    forged = Manifest(
        id=like.id[:-6] + "f0f0f0",
        created_at=like.created_at,
        size=len(data),
        chunk_size=like.chunk_size,
        chunks=[digest],
        meta={**like.meta, "source": "app"},
    ).sealed()
    (arch / manifest_key(forged.id)).write_bytes(forged.to_json())
    return forged.id


def test_forged_backup_with_a_resealed_manifest_is_detected(arch: Path, repo: Repository) -> None:
    real = backup(repo, [rand()], source="app")
    forged = forge_backup(arch, b"attacker" * (CS // 8), real)
    repo = reopen(arch)
    with pytest.raises(ArchiveCorrupt, match=f"backup {forged}: manifest not an encrypted"):
        repo.manifest(forged)
    report = repo.check(read_data=True)
    assert list(report.bad_manifests) == [forged]
    assert any("not an encrypted lunseal object" in p.problem for p in report.chunk_problems)
    assert restore(repo, repo.manifest(real.id))  # the real backup is untouched


def test_forged_backup_is_accepted_by_an_unencrypted_archive(tmp_path: Path) -> None:
    """The documented limit: without a key, digests prove only the absence of accidents."""
    repo = Repository.open_local(tmp_path, chunk_size=CS)
    real = backup(repo, [rand()], source="app")
    forged = forge_backup(tmp_path, b"attacker" * (CS // 8), real)
    assert repo.check(read_data=True).ok
    assert restore(repo, repo.manifest(forged)) == b"attacker" * (CS // 8)


def test_chunk_replaced_by_a_plain_one_with_the_same_name(arch: Path, repo: Repository) -> None:
    m = backup(repo, [rand()])
    digest = m.chunks[0]
    assert digest is not None
    _, blob = plain_chunk(b"attacker" * (CS // 8))
    (arch / chunk_key(digest)).write_bytes(blob)
    with pytest.raises(ArchiveCorrupt, match=f"chunk {digest} is corrupt .*not an encrypted"):
        restore(repo, m)
    assert [p.digest for p in repo.check(read_data=True).chunk_problems] == [digest]


def test_swapped_chunk_is_detected(arch: Path, repo: Repository) -> None:
    m = backup(repo, [rand(), rand()])
    first, second = m.chunks
    assert first
    assert second
    (arch / chunk_key(first)).write_bytes((arch / chunk_key(second)).read_bytes())
    problems = repo.check(read_data=True).chunk_problems
    assert [(p.digest, p.problem) for p in problems] == [
        (first, "authentication failed (forged, swapped or damaged)")
    ]
    with pytest.raises(ArchiveCorrupt, match=f"chunk {first} is corrupt"):
        restore(repo, m)


def flip(path: Path, offset: int) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


DAMAGE = {
    "bit flip in the ciphertext": lambda p: flip(p, p.stat().st_size // 2),
    "bit flip in the tag": lambda p: flip(p, p.stat().st_size - 1),
    "bit flip in the nonce": lambda p: flip(p, 10),
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]),
    "tag cut off": lambda p: p.write_bytes(p.read_bytes()[:-16]),
    "empty": lambda p: p.write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGE.values(), ids=DAMAGE.keys())
def test_damaged_chunk_and_manifest(arch: Path, repo: Repository, damage: object) -> None:
    assert callable(damage)
    m = backup(repo, [rand()])
    keep = backup(repo, [rand()])
    digest = m.chunks[0]
    assert digest is not None
    damage(arch / chunk_key(digest))
    damage(arch / manifest_key(keep.id))
    report = reopen(arch).check(read_data=True)
    assert list(report.bad_manifests) == [keep.id]
    assert [p.digest for p in report.chunk_problems] == [digest]
    with pytest.raises(ArchiveCorrupt, match=digest):
        restore(repo, m)
    with pytest.raises(ArchiveCorrupt, match=keep.id):
        repo.manifest(keep.id)


def test_manifest_replaced_by_another_backups_manifest(arch: Path, repo: Repository) -> None:
    """Rolling one backup back to an older one's record (same chunk size, valid
    ciphertext) fails: each manifest is bound to its own id."""
    old = backup(repo, [rand()], source="app")
    new = backup(repo, [rand()], source="app")
    (arch / manifest_key(new.id)).write_bytes((arch / manifest_key(old.id)).read_bytes())
    with pytest.raises(ArchiveCorrupt, match=f"backup {new.id}: manifest authentication failed"):
        repo.manifest(new.id)
    assert list(repo.check().bad_manifests) == [new.id]


def test_objects_of_another_archive_with_the_same_passphrase(
    arch: Path, repo: Repository, tmp_path: Path
) -> None:
    other = init(tmp_path / "other")
    theirs = backup(other, [rand()], source="app")
    for key in (manifest_key(theirs.id), chunk_key(str(theirs.chunks[0]))):
        target = arch / key
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((tmp_path / "other" / key).read_bytes())
    report = repo.check(read_data=True)
    assert list(report.bad_manifests) == [theirs.id]
    assert len(report.chunk_problems) == 1


def test_downgrade_to_an_unencrypted_archive_is_refused(arch: Path, repo: Repository) -> None:
    """An attacker replaces the config by an unencrypted one and plants plain objects."""
    real = backup(repo, [rand()], source="app")
    (arch / "config").write_text(
        json.dumps({"format": "lunseal-archive", "version": 1, "chunk_size": CS})
    )
    forge_backup(arch, b"attacker" * (CS // 8), real)
    with pytest.raises(ArchiveCorrupt, match="not encrypted, yet a passphrase"):
        reopen(arch)
    # Nor is an unencrypted one created in passing for a user who expects encryption.
    with pytest.raises(NotFound, match="does not exist"):
        Repository.open_local(arch.parent / "new", unlock=Unlock(PASS))
    assert not (arch.parent / "new").exists()
    (arch.parent / "new").mkdir()
    with pytest.raises(NotFound, match="archive init"):
        Repository.open_local(arch.parent / "new", unlock=Unlock(PASS))
    assert not (arch.parent / "new" / "config").exists()


CONFIG_EDITS = {
    "chunk size": ({"chunk_size": 2 * CS}, ArchiveCorrupt, "edited chunk size"),
    "repository id": ({"repository": "ab" * 16}, Unauthorized, "another archive"),
    "mode": ({"encryption": "keyfile"}, Unauthorized, "does not exist"),
    "unknown mode": ({"encryption": "rot13"}, ArchiveCorrupt, "unknown encryption"),
}


@pytest.mark.parametrize(("edit", "error", "message"), CONFIG_EDITS.values(), ids=CONFIG_EDITS)
def test_edited_config_is_refused(
    arch: Path,
    repo: Repository,
    edit: dict[str, object],
    error: type[Exception],
    message: str,
) -> None:
    config = json.loads((arch / "config").read_bytes())
    (arch / "config").write_text(json.dumps({**config, **edit}))
    with pytest.raises(error, match=message):
        reopen(arch)


def unencrypted_config(arch: Path) -> None:
    (arch / "config").write_text(
        json.dumps({"format": "lunseal-archive", "version": 1, "chunk_size": CS})
    )


def test_downgrade_is_refused_even_without_a_passphrase(arch: Path, repo: Repository) -> None:
    """The user's own record says this directory held an encrypted archive."""
    real = backup(repo, [rand()], source="app")
    unencrypted_config(arch)
    forge_backup(arch, b"attacker" * (CS // 8), real)
    with pytest.raises(ArchiveCorrupt, match=r"was encrypted .* is now unencrypted"):
        Repository.open_local(arch, create=False)
    with pytest.raises(ArchiveCorrupt, match="forgery"):
        Repository.open_local(arch)  # as backup create opens it


def test_vanished_encrypted_archive_is_not_recreated_in_clear(arch: Path, repo: Repository) -> None:
    backup(repo, [rand()])
    shutil.rmtree(arch)
    with pytest.raises(ArchiveCorrupt, match="is now gone"):
        Repository.open_local(arch)
    assert not arch.exists()
    # A deliberate new start is the user's to make.
    Repository.init_local(arch, "none", chunk_size=CS)
    assert Repository.open_local(arch, create=False).key is None


def test_other_users_or_unrecorded_paths_keep_working(arch: Path, tmp_path: Path) -> None:
    plain = Repository.open_local(tmp_path / "plain", chunk_size=CS)
    backup(plain, [rand()])
    assert Repository.open_local(tmp_path / "plain", create=False).key is None
