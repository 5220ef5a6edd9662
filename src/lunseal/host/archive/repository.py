"""The archive repository: compressed, content-addressed chunks and one manifest per backup.

Layout in a :class:`Storage`::

    config                      format version and chunk size (JSON)
    key                         the wrapped key of a ``repokey`` repository
    chunks/<d[:2]>/<d>          header + zstd(chunk), d = blake3 hex of the raw chunk
    manifests/<id>.json         one per committed backup, written last

In an encrypted repository (see :mod:`lunseal.host.archive.crypto`) ``d`` is
keyed BLAKE3 of the chunk, and chunk objects and manifests are sealed
(AES-256-GCM bound to their names); ``config`` then has version 2 and names
the encryption mode and the repository id, which the key must match.

A backup is only visible once its manifest exists, so a killed backup leaves
unreferenced chunks (garbage for prune) and never a half backup.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import blake3
import zstandard

from lunseal.errors import (
    ArchiveCorrupt,
    Conflict,
    InvalidArgument,
    NotFound,
    NotSupported,
    Unauthorized,
)
from lunseal.host.archive import known
from lunseal.host.archive.crypto import (
    ENCRYPTION_MODES,
    ArchiveKey,
    Kdf,
    Unlock,
    default_key_file,
    key_file_repository,
    new_repository_id,
    read_key_file,
    unwrap_key,
    wrap_key,
    write_key_file,
)
from lunseal.host.archive.storage import LocalStorage, Storage

MiB = 1 << 20
DEFAULT_CHUNK_SIZE = 1 * MiB  # fine enough that a 1% change reads about 1%
FORMAT_VERSION = 1
#: Config version of encrypted repositories: older lunseal refuses them rather
#: than writing plaintext chunks into them.
ENCRYPTED_CONFIG_VERSION = 2
ZSTD_LEVEL = 3
#: A backup waits this long for a running prune; prune never waits for backups.
BACKUP_LOCK_WAIT = 60.0
#: Temp files of interrupted puts older than this are removed by prune.
STALE_TEMP_AGE = 3600.0

_CONFIG_KEY = "config"
_CONFIG_FORMAT = "lunseal-archive"
_KEY_OBJECT = "key"
# Magic + version + raw length: a foreign, truncated or future object is told
# apart from a damaged one before zstd ever sees it.
_CHUNK_HEADER = struct.Struct("<7sBI")
_CHUNK_MAGIC = b"LSCHUNK"
_DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
_ID_RE = re.compile(r"^\d{8}T\d{6}Z-[0-9a-f]{6}$")
_REPO_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_NAME_LIKE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def chunk_key(digest: str) -> str:
    return f"chunks/{digest[:2]}/{digest}"


def manifest_key(backup_id: str) -> str:
    return f"manifests/{backup_id}.json"


def _json_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` as it reads back from JSON, so a committed manifest equals its later load."""
    try:
        normal = json.loads(_canonical(meta))
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"backup metadata must be plain JSON: {exc}") from None
    if not isinstance(normal, dict):
        raise InvalidArgument("backup metadata must be a JSON object")
    return normal


def _is_zero(data: bytes) -> bool:
    return data.count(0) == len(data)


@dataclass(frozen=True)
class Manifest:
    """One committed backup: the chunk list of an image of ``size`` bytes."""

    id: str
    created_at: str  # ISO 8601, UTC
    size: int
    chunk_size: int
    chunks: list[str | None]  # blake3 digest per chunk; None = all zeros
    meta: dict[str, Any]
    digest: str = ""  # blake3 of the canonical JSON of every other field
    #: The id key of an encrypted repository (never stored in the manifest):
    #: what :meth:`chunk_id` needs to compare data with ``chunks``.
    id_key: bytes | None = field(default=None, repr=False, compare=False)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def chunk_length(self, index: int) -> int:
        """Length of chunk ``index``; only the last one may be short."""
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def chunk_id(self, data: bytes) -> str:
        """The id ``data`` has in this backup's repository (keyed if it is encrypted)."""
        if self.id_key is None:
            return blake3.blake3(data).hexdigest()
        return blake3.blake3(data, key=self.id_key).hexdigest()

    def body(self) -> dict[str, Any]:
        body = asdict(self)
        del body["digest"], body["id_key"]
        body["version"] = FORMAT_VERSION
        return body

    def sealed(self) -> Manifest:
        return Manifest(
            **{**asdict(self), "digest": blake3.blake3(_canonical(self.body())).hexdigest()}
        )

    def to_json(self) -> bytes:
        return (
            json.dumps({**self.body(), "digest": self.digest}, indent=1, sort_keys=True) + "\n"
        ).encode()

    @classmethod
    def from_json(cls, backup_id: str, raw: bytes) -> Manifest:
        """Parse and verify; any damage raises :class:`ArchiveCorrupt` naming the backup."""
        try:
            obj = json.loads(raw)
            version = obj.pop("version")
            if "id_key" in obj:  # only ever set in memory, by the repository
                raise ValueError("unexpected field id_key")
            if version != FORMAT_VERSION:
                raise ValueError(f"unsupported manifest version {version!r}")
            manifest = cls(**obj)
            problem = manifest._problem(backup_id)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            problem = f"unreadable: {exc}"
        if problem:
            raise ArchiveCorrupt(f"backup {backup_id}: manifest {problem}")
        return manifest

    def _problem(self, backup_id: str) -> str | None:
        if self.sealed().digest != self.digest:
            return "digest mismatch (damaged or edited)"
        # Past the digest only a buggy or hostile writer gets: still refuse nonsense.
        if self.id != backup_id:
            return f"names a different backup id {self.id!r}"
        if not _types_ok(self):
            return "has fields of the wrong type"
        if len(self.chunks) != math.ceil(self.size / self.chunk_size):
            return f"lists {len(self.chunks)} chunks for {self.size} bytes"
        if not all(d is None or _DIGEST_RE.match(d) for d in self.chunks):
            return "lists an invalid chunk digest"
        self.created  # noqa: B018 -- raises ValueError if the time is not ISO 8601
        return None


def _types_ok(m: Manifest) -> bool:
    sizes_ok = isinstance(m.size, int) and isinstance(m.chunk_size, int)
    sizes_ok = sizes_ok and m.size >= 0 and m.chunk_size > 0
    return sizes_ok and isinstance(m.chunks, list) and isinstance(m.meta, dict)


@dataclass
class ChunkProblem:
    digest: str
    problem: str  # "missing" or what is wrong with the stored object
    backups: list[str]  # ids of the backups that reference the chunk


@dataclass
class CheckReport:
    manifests_checked: int = 0
    chunks_checked: int = 0  # chunk objects read and verified (read_data only)
    bad_manifests: dict[str, str] = field(default_factory=dict)  # id -> problem
    chunk_problems: list[ChunkProblem] = field(default_factory=list)
    unreferenced_chunks: int = 0  # garbage left by killed backups: prune removes it

    @property
    def ok(self) -> bool:
        return not self.bad_manifests and not self.chunk_problems

    def affected_backups(self) -> list[str]:
        ids = set(self.bad_manifests)
        for problem in self.chunk_problems:
            ids.update(problem.backups)
        return sorted(ids)

    def lines(self) -> list[str]:
        out = [
            f"backup {i}: {problem.removeprefix(f'backup {i}: ')}"
            for i, problem in sorted(self.bad_manifests.items())
        ]
        for p in self.chunk_problems:
            users = ", ".join(p.backups) or "no backup"
            out.append(f"chunk {p.digest}: {p.problem}; affects {users}")
        return out


@dataclass
class PruneDecision:
    backup: str
    source: str
    created_at: str
    keep: bool


@dataclass
class PruneReport:
    kept: list[str]
    removed: list[str]  # backup ids whose manifests were (or would be) deleted
    chunks_removed: int
    bytes_freed: int
    dry_run: bool
    #: Every backup the policy looked at, oldest first, with its verdict.
    decisions: list[PruneDecision] = field(default_factory=list)


@dataclass
class WriteStats:
    chunks_written: int = 0  # new objects stored
    chunks_deduplicated: int = 0  # already stored: by an earlier backup or this one
    chunks_reused: int = 0  # taken from a previous backup without reading the source
    chunks_zero: int = 0
    bytes_stored: int = 0  # compressed bytes of the new objects


class Repository:
    """Chunks and manifests in a :class:`Storage`; see the module docstring for the layout."""

    def __init__(
        self,
        storage: Storage,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        clock: Callable[[], datetime] = _utcnow,
        key: ArchiveKey | None = None,
        encryption: str = "none",
    ) -> None:
        if chunk_size < 4096 or chunk_size > 64 * MiB or chunk_size % 4096:
            raise InvalidArgument(
                f"chunk size must be a multiple of 4 KiB up to 64 MiB: {chunk_size}"
            )
        self.storage = storage
        self.chunk_size = chunk_size
        self.clock = clock
        #: None: unencrypted, ids are plain blake3 and anyone who can write may forge.
        self.key = key
        self.encryption = encryption
        #: The wrapped key this repository was opened with (what ``key export`` writes).
        self.key_blob: bytes | None = None

    @classmethod
    def open(
        cls,
        storage: Storage,
        create: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        clock: Callable[[], datetime] = _utcnow,
        unlock: Unlock | None = None,
    ) -> Repository:
        """Open the repository in ``storage``; ``chunk_size`` only applies when creating it.

        Only an unencrypted repository is created here (``init`` makes encrypted
        ones); an encrypted one needs ``unlock``.  Given a passphrase or key file,
        an unencrypted repository is refused: it may be a forgery put in place
        of the encrypted one."""
        unlock = unlock or Unlock()
        config = cls._read_config(storage)
        if config is None:
            if not create:
                raise NotFound("no archive repository here (no config object)")
            if unlock.given:
                raise NotFound(
                    "no archive repository here: create an encrypted one with lunseal archive init"
                )
            repo = cls(storage, chunk_size, clock)
            storage.put(_CONFIG_KEY, _canonical(repo._config()))
            return repo
        size, encryption, repo_id = cls._parse_config(config)
        if encryption == "none":
            if unlock.given:
                raise ArchiveCorrupt(
                    "this archive is not encrypted, yet a passphrase or key file was given: "
                    "it may have been replaced by a forged unencrypted one (unset "
                    "LUNSEAL_PASSPHRASE and the key file to use an unencrypted archive)"
                )
            return cls(storage, size, clock)
        blob = cls._key_blob(storage, encryption, repo_id, unlock)
        key = cls._unlock(blob, repo_id, size, unlock)
        repo = cls(storage, size, clock, key, encryption)
        repo.key_blob = blob
        return repo

    @classmethod
    def open_local(
        cls,
        path: Path,
        create: bool = True,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        clock: Callable[[], datetime] = _utcnow,
        unlock: Unlock | None = None,
    ) -> Repository:
        """Open the archive directory ``path``; an archive this user last opened
        encrypted must still be encrypted (see :mod:`lunseal.host.archive.known`)."""
        was = known.encrypted_as(path)
        create = create and was is None
        try:
            if create and not (unlock and unlock.given):
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
            elif not path.is_dir():
                raise NotFound(f"archive directory {path} does not exist")
            repo = cls.open(LocalStorage(path), create, chunk_size, clock, unlock)
        except NotFound:
            if was is None:
                raise
            repo = None
        if repo is None or (repo.key is None and was is not None):
            state = "gone" if repo is None else "unencrypted"
            raise ArchiveCorrupt(
                f"archive {path} was encrypted (repository {was}) when last used and is now "
                f"{state}: it may have been replaced by a forgery. If you removed it yourself, "
                f"run lunseal archive init again or delete its line in {known.record_file()}"
            )
        if repo.key is not None:
            known.remember(path, repo.key.repository)
        return repo

    @classmethod
    def init_local(
        cls,
        path: Path,
        encryption: str,
        unlock: Unlock | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        kdf: Kdf | None = None,
    ) -> tuple[Repository, Path | None]:
        """:meth:`init` in the directory ``path`` (created if need be)."""
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        repo, key_path = cls.init(LocalStorage(path), encryption, unlock, chunk_size, kdf)
        if repo.key is not None:
            known.remember(path, repo.key.repository)
        else:
            known.forget(path)
        return repo, key_path

    @classmethod
    def init(
        cls,
        storage: Storage,
        encryption: str,
        unlock: Unlock | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        kdf: Kdf | None = None,
    ) -> tuple[Repository, Path | None]:
        """Create a new repository; (it, the key file written for ``keyfile`` mode)."""
        unlock = unlock or Unlock()
        if encryption not in ENCRYPTION_MODES:
            raise InvalidArgument(f"encryption must be one of {', '.join(ENCRYPTION_MODES)}")
        if cls._read_config(storage) is not None:
            raise Conflict("an archive repository already exists here")
        if encryption == "none":
            if unlock.given:
                raise InvalidArgument("--encryption none takes no passphrase or key file")
            return cls.open(storage, chunk_size=chunk_size), None
        if not unlock.passphrase:
            raise InvalidArgument(
                "an encrypted archive needs a passphrase: set LUNSEAL_PASSPHRASE "
                "or give --passphrase-file"
            )
        repo_id = new_repository_id()
        key = ArchiveKey.generate(repo_id, chunk_size)
        repo = cls(storage, chunk_size, key=key, encryption=encryption)
        repo.key_blob = wrap_key(key, unlock.passphrase, kdf)
        key_path = None
        if encryption == "repokey":
            storage.put(_KEY_OBJECT, repo.key_blob)
        else:
            key_path = unlock.key_file or default_key_file(repo_id)
            write_key_file(key_path, repo.key_blob)
        # The config last: until it exists, there is no repository to use.
        storage.put(_CONFIG_KEY, _canonical(repo._config()))
        return repo, key_path

    @classmethod
    def import_key(cls, storage: Storage, blob: bytes, unlock: Unlock) -> Path | None:
        """Install a key exported earlier (after a lost key file or a damaged ``key``
        object); it must unlock with the passphrase and belong to this repository.
        Returns the key file written in ``keyfile`` mode."""
        config = cls._read_config(storage)
        if config is None:
            raise NotFound("no archive repository here (no config object)")
        size, encryption, repo_id = cls._parse_config(config)
        if encryption == "none":
            raise InvalidArgument("this archive is not encrypted: it has no key")
        cls._unlock(blob, repo_id, size, unlock)
        if encryption == "repokey":
            storage.put(_KEY_OBJECT, blob)
            return None
        path = unlock.key_file or default_key_file(repo_id)
        write_key_file(path, blob, overwrite=True)
        return path

    def _config(self) -> dict[str, Any]:
        config: dict[str, Any] = {
            "format": _CONFIG_FORMAT,
            "version": FORMAT_VERSION,
            "chunk_size": self.chunk_size,
        }
        if self.key is not None:
            config.update(
                version=ENCRYPTED_CONFIG_VERSION,
                encryption=self.encryption,
                repository=self.key.repository,
            )
        return config

    @staticmethod
    def _read_config(storage: Storage) -> Any:
        """The parsed config object, None if there is none."""
        try:
            return json.loads(storage.get(_CONFIG_KEY))
        except NotFound:
            return None
        except ValueError as exc:
            raise ArchiveCorrupt(f"archive config unreadable: {exc}") from None

    @staticmethod
    def _parse_config(config: Any) -> tuple[int, str, str]:
        """(chunk size, encryption mode, repository id or "")."""
        if not isinstance(config, dict) or config.get("format") != _CONFIG_FORMAT:
            raise ArchiveCorrupt("archive config is not a lunseal archive config")
        version = config.get("version")
        if version not in (FORMAT_VERSION, ENCRYPTED_CONFIG_VERSION):
            raise NotSupported(f"archive format version {version} is not supported")
        size = config.get("chunk_size")
        if not isinstance(size, int):
            raise ArchiveCorrupt("archive config has no valid chunk size")
        if version == FORMAT_VERSION:
            return size, "none", ""
        encryption, repo_id = config.get("encryption"), config.get("repository")
        if encryption not in ("repokey", "keyfile"):
            raise ArchiveCorrupt(f"archive config names an unknown encryption {encryption!r}")
        if not isinstance(repo_id, str) or not _REPO_ID_RE.match(repo_id):
            raise ArchiveCorrupt("archive config has no valid repository id")
        return size, encryption, repo_id

    @staticmethod
    def _key_blob(storage: Storage, encryption: str, repo_id: str, unlock: Unlock) -> bytes:
        if encryption == "keyfile":
            path = unlock.key_file or default_key_file(repo_id)
            if not path.exists():
                raise Unauthorized(
                    f"archive key file {path} does not exist: give --key-file, set "
                    "LUNSEAL_KEY_FILE or put an exported key back with lunseal archive key import"
                )
            return read_key_file(path)
        try:
            return storage.get(_KEY_OBJECT)
        except NotFound:
            raise ArchiveCorrupt(
                "the archive's key object is missing: restore it with lunseal archive key import"
            ) from None

    @staticmethod
    def _unlock(blob: bytes, repo_id: str, chunk_size: int, unlock: Unlock) -> ArchiveKey:
        if not unlock.passphrase:
            raise Unauthorized(
                "this archive is encrypted: set LUNSEAL_PASSPHRASE or give --passphrase-file"
            )
        if key_file_repository(blob) != repo_id:
            raise Unauthorized(f"the key belongs to another archive, not to repository {repo_id}")
        key = unwrap_key(blob, unlock.passphrase)
        # The config is not encrypted: its chunk size must be the one sealed in the key.
        if key.chunk_size != chunk_size:
            raise ArchiveCorrupt("archive config does not match its key (edited chunk size)")
        return key

    # -- chunks -------------------------------------------------------------

    def store_chunk(self, data: bytes) -> tuple[str | None, int]:
        """Store one raw chunk unless it is zero or already present.

        Returns (digest or None for zeros, compressed bytes written: 0 if deduplicated).
        """
        if _is_zero(data):
            return None, 0
        digest = self.chunk_id(data)
        key = chunk_key(digest)
        if self.storage.exists(key):
            return digest, 0
        body = zstandard.ZstdCompressor(level=ZSTD_LEVEL).compress(data)
        blob = _CHUNK_HEADER.pack(_CHUNK_MAGIC, FORMAT_VERSION, len(data)) + body
        if self.key is not None:
            blob = self.key.seal("chunk", digest, blob)
        self.storage.put(key, blob)
        return digest, len(blob)

    def read_chunk(self, digest: str) -> bytes:
        """The raw chunk, verified against its digest; damage raises :class:`ArchiveCorrupt`."""
        if not _DIGEST_RE.match(digest):
            raise InvalidArgument(f"invalid chunk digest {digest!r}")
        try:
            blob = self.storage.get(chunk_key(digest))
        except NotFound:
            users = self._users_of(digest)
            if not users:
                raise
            raise ArchiveCorrupt(
                f"chunk {digest} is missing; affects backups {', '.join(users)}"
            ) from None
        problem, data = self._decode(digest, blob)
        if problem:
            named = ", ".join(self._users_of(digest)) or "no backup"
            raise ArchiveCorrupt(f"chunk {digest} is corrupt ({problem}); affects backups {named}")
        return data

    def read_backup_chunk(self, manifest: Manifest, index: int) -> bytes:
        """Chunk ``index`` of a backup at its exact length, zeros included."""
        digest = manifest.chunks[index]
        if digest is None:
            return bytes(manifest.chunk_length(index))
        data = self.read_chunk(digest)
        if len(data) != manifest.chunk_length(index):
            raise ArchiveCorrupt(
                f"backup {manifest.id}: chunk {index} has the wrong length {len(data)}"
            )
        return data

    def chunk_id(self, data: bytes) -> str:
        """The id of a chunk: blake3 of its data, keyed in an encrypted repository."""
        if self.key is None:
            return blake3.blake3(data).hexdigest()
        return self.key.chunk_id(data)

    def _decode(self, digest: str, blob: bytes) -> tuple[str | None, bytes]:
        """(problem or None, raw data)."""
        if self.key is not None:
            problem, blob = self.key.unseal("chunk", digest, blob)
            if problem:
                return problem, b""
        if len(blob) < _CHUNK_HEADER.size:
            return "truncated header", b""
        magic, version, length = _CHUNK_HEADER.unpack_from(blob)
        if magic != _CHUNK_MAGIC:
            return "not a lunseal chunk", b""
        if version != FORMAT_VERSION:
            return f"unknown chunk format version {version}", b""
        body = blob[_CHUNK_HEADER.size :]
        try:
            # Checking the frame's own size first bounds the allocation: a flipped
            # size field must not make us allocate gigabytes.
            if (
                length > self.chunk_size
                or zstandard.get_frame_parameters(body).content_size != length
            ):
                return "bad length", b""
            data = zstandard.ZstdDecompressor().decompress(body, max_output_size=length)
        except zstandard.ZstdError as exc:
            return f"undecodable: {exc}", b""
        if len(data) != length or self.chunk_id(data) != digest:
            return "digest mismatch", b""
        return None, data

    def _users_of(self, digest: str) -> list[str]:
        """Ids of the (readable) backups that reference ``digest``: for error messages."""
        good, _bad = self._load_manifests()
        return [m.id for m in good if digest in m.chunks]

    # -- manifests ----------------------------------------------------------

    def begin_backup(self, meta: dict[str, Any], size: int) -> BackupWriter:
        """Start a backup of an image of ``size`` bytes; nothing is visible until commit."""
        return BackupWriter(self, meta, size)

    def manifest_ids(self) -> list[str]:
        """Ids of every committed backup (objects with other names are ignored)."""
        ids = (
            k.removeprefix("manifests/").removesuffix(".json")
            for k in self.storage.list("manifests/")
        )
        return [i for i in ids if _ID_RE.match(i)]

    def manifest(self, backup_id: str) -> Manifest:
        if not _ID_RE.match(backup_id):
            if not _NAME_LIKE_RE.fullmatch(backup_id):  # a path, or worse: a bad request
                raise InvalidArgument(f"invalid backup id {backup_id!r}")
            # A plain word no backup has ("nope"): simply not there (exit 3).
            raise NotFound(f"no backup {backup_id} in the archive")
        try:
            raw = self.storage.get(manifest_key(backup_id))
        except NotFound:
            raise NotFound(f"no backup {backup_id} in the archive") from None
        if self.key is None:
            return Manifest.from_json(backup_id, raw)
        # Bound to its id: another backup's manifest copied here fails like a forgery.
        problem, raw = self.key.unseal("manifest", backup_id, raw)
        if problem:
            raise ArchiveCorrupt(f"backup {backup_id}: manifest {problem}")
        return replace(Manifest.from_json(backup_id, raw), id_key=self.key.id_key)

    def manifests(self) -> list[Manifest]:
        """Every backup, oldest first; a damaged manifest raises :class:`ArchiveCorrupt`."""
        return sorted((self.manifest(i) for i in self.manifest_ids()), key=_age_key)

    def _load_manifests(self) -> tuple[list[Manifest], dict[str, str]]:
        """(readable manifests, {id: problem} of the damaged ones)."""
        good: list[Manifest] = []
        bad: dict[str, str] = {}
        for backup_id in self.manifest_ids():
            try:
                good.append(self.manifest(backup_id))
            except (ArchiveCorrupt, InvalidArgument) as exc:
                bad[backup_id] = exc.message
        return sorted(good, key=_age_key), bad

    def _write_manifest(self, manifest: Manifest) -> None:
        raw = manifest.to_json()
        if self.key is not None:
            raw = self.key.seal("manifest", manifest.id, raw)
        self.storage.put(manifest_key(manifest.id), raw)

    def new_backup_id(self, created: datetime) -> str:
        """A sortable id that no committed backup has yet."""
        while True:
            backup_id = f"{created.strftime('%Y%m%dT%H%M%SZ')}-{secrets.token_hex(3)}"
            if not self.storage.exists(manifest_key(backup_id)):
                return backup_id

    def _stored_digests(self) -> set[str]:
        """Digests of the chunk objects; anything else under chunks/ is not ours to judge."""
        keys = self.storage.list("chunks/")
        return {
            d for k in keys if _DIGEST_RE.match(d := k.rpartition("/")[2]) and k == chunk_key(d)
        }

    # -- check and prune ----------------------------------------------------

    def check(self, read_data: bool = False) -> CheckReport:
        """Verify manifests and chunk presence; with ``read_data`` every chunk's content too."""
        good, bad = self._load_manifests()
        report = CheckReport(manifests_checked=len(good) + len(bad), bad_manifests=bad)
        users = _chunk_users(good)
        stored = self._stored_digests()
        for digest in sorted(users.keys() - stored):
            report.chunk_problems.append(ChunkProblem(digest, "missing", users[digest]))
        report.unreferenced_chunks = len(stored - users.keys())
        if read_data:
            # Unreferenced chunks are read too: dedup would let a future backup use them.
            for digest in sorted(stored):
                report.chunks_checked += 1
                problem = self._check_stored_chunk(digest)
                if problem:
                    report.chunk_problems.append(
                        ChunkProblem(digest, problem, users.get(digest, []))
                    )
        return report

    def _check_stored_chunk(self, digest: str) -> str | None:
        try:
            blob = self.storage.get(chunk_key(digest))
        except NotFound:
            return "missing (deleted during the check)"
        return self._decode(digest, blob)[0]

    def prune(
        self,
        keep_last: int | None,
        keep_daily: int | None,
        dry_run: bool = False,
        source: str | None = None,
    ) -> PruneReport:
        """Delete backups outside the policy, then every chunk no remaining backup uses.

        The policy applies to each source LUN's backups on their own (as restic,
        borg and PBS group them): keeping the last 2 keeps 2 of every LUN.  With
        ``source``, only that LUN's backups are considered."""
        if not (keep_last or keep_daily) or min(keep_last or 0, keep_daily or 0) < 0:
            raise InvalidArgument("prune needs keep_last and/or keep_daily of at least 1")
        # Exclusive: a running backup may rely on chunks that no manifest references yet.
        with self.storage.lock(exclusive=True):
            all_backups = self.manifests()  # a damaged manifest stops prune: its chunks are unknown
            considered = [m for m in all_backups if source is None or _source(m) == source]
            kept = {m.id for m in all_backups} - {m.id for m in considered}
            for group in _by_source(considered).values():
                kept |= _select(group, keep_last or 0, keep_daily or 0)
            doomed = [m for m in all_backups if m.id not in kept]
            garbage = self._unreferenced_chunks([m for m in all_backups if m.id in kept])
            freed = sum(self.storage.size(manifest_key(m.id)) for m in doomed)
            freed += sum(self.storage.size(chunk_key(d)) for d in garbage)
            if not dry_run:
                self._delete(doomed, garbage)
        return PruneReport(
            kept=[m.id for m in considered if m.id in kept],
            removed=[m.id for m in doomed],
            chunks_removed=len(garbage),
            bytes_freed=freed,
            dry_run=dry_run,
            decisions=[
                PruneDecision(m.id, _source(m), m.created_at, m.id in kept) for m in considered
            ],
        )

    def _unreferenced_chunks(self, kept: list[Manifest]) -> list[str]:
        used = _chunk_users(kept)
        return sorted(self._stored_digests() - used.keys())

    def _delete(self, doomed: list[Manifest], garbage: list[str]) -> None:
        # Manifests first: a crash in between leaves garbage chunks, never a
        # backup that references a deleted chunk.
        for manifest in doomed:
            self.storage.delete(manifest_key(manifest.id))
        for digest in garbage:
            self.storage.delete(chunk_key(digest))
        self.storage.sweep(STALE_TEMP_AGE)


def _source(manifest: Manifest) -> str:
    return str(manifest.meta.get("source", ""))


def _by_source(backups: list[Manifest]) -> dict[str, list[Manifest]]:
    groups: dict[str, list[Manifest]] = {}
    for m in backups:
        groups.setdefault(_source(m), []).append(m)
    return groups


def _age_key(manifest: Manifest) -> tuple[datetime, str]:
    return manifest.created, manifest.id


def _chunk_users(manifests: Iterable[Manifest]) -> dict[str, list[str]]:
    users: dict[str, list[str]] = {}
    for m in manifests:
        for digest in dict.fromkeys(d for d in m.chunks if d is not None):
            users.setdefault(digest, []).append(m.id)
    return users


def _select(backups: list[Manifest], keep_last: int, keep_daily: int) -> set[str]:
    """Ids to keep: the newest ``keep_last``, plus the newest of each of the last
    ``keep_daily`` days that have backups (days in UTC, so the result is host-independent)."""
    newest_first = sorted(backups, key=_age_key, reverse=True)
    kept = {m.id for m in newest_first[:keep_last]}
    days: set[date] = set()
    for m in newest_first:
        day = m.created.astimezone(UTC).date()
        if day not in days and len(days) < keep_daily:
            days.add(day)
            kept.add(m.id)
    return kept


class BackupWriter:
    """Collects the chunks of one backup; :meth:`commit` makes it visible.

    Holds the repository lock shared from creation to close, so prune cannot
    delete a chunk this backup deduplicated against before the manifest exists.
    ``add_chunk`` and ``reuse_chunk`` may be called from several threads.
    """

    def __init__(self, repo: Repository, meta: dict[str, Any], size: int) -> None:
        if size < 0:
            raise InvalidArgument(f"backup size must not be negative: {size}")
        self.repo = repo
        self.size = size
        #: May be updated until commit (e.g. bytes read, known only at the end).
        self.meta = _json_meta(meta)
        self.stats = WriteStats()
        self._chunks: list[str | None] = [None] * math.ceil(size / repo.chunk_size)
        self._filled = [False] * len(self._chunks)
        self._mutex = threading.Lock()
        self._lock = repo.storage.lock(exclusive=False, timeout=BACKUP_LOCK_WAIT)
        self._lock.__enter__()
        self._open = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Release the lock; an uncommitted backup leaves only garbage chunks."""
        if self._open:
            self._open = False
            self._lock.__exit__(None, None, None)

    def _expected_length(self, index: int) -> int:
        if not 0 <= index < len(self._chunks):
            raise InvalidArgument(f"chunk index {index} outside a {self.size}-byte backup")
        return min(self.repo.chunk_size, self.size - index * self.repo.chunk_size)

    def add_chunk(self, index: int, data: bytes) -> str | None:
        """Store chunk ``index`` (read from the source); returns its digest, None for zeros."""
        self._require_open()
        if len(data) != self._expected_length(index):
            raise InvalidArgument(
                f"chunk {index} must be {self._expected_length(index)} bytes, not {len(data)}"
            )
        digest, written = self.repo.store_chunk(data)
        with self._mutex:
            self._fill(index, digest)
            if digest is None:
                self.stats.chunks_zero += 1
            elif written:
                self.stats.chunks_written += 1
                self.stats.bytes_stored += written
            else:
                self.stats.chunks_deduplicated += 1
        return digest

    def reuse_chunk(self, index: int, digest: str | None) -> None:
        """Reference a chunk a previous backup stored (an unchanged region of an incremental)."""
        self._require_open()
        self._expected_length(index)
        if digest is not None:
            if not _DIGEST_RE.match(digest):
                raise InvalidArgument(f"invalid chunk digest {digest!r}")
            if not self.repo.storage.exists(chunk_key(digest)):
                raise ArchiveCorrupt(
                    f"chunk {digest} to reuse for chunk {index} is not in the archive"
                )
        with self._mutex:
            self._fill(index, digest)
            self.stats.chunks_reused += 1

    def _fill(self, index: int, digest: str | None) -> None:
        if self._filled[index]:
            raise InvalidArgument(f"chunk {index} was already added to this backup")
        self._filled[index] = True
        self._chunks[index] = digest

    def _require_open(self) -> None:
        if not self._open:
            raise InvalidArgument("this backup is already committed or closed")

    def commit(self) -> Manifest:
        """Write the manifest (atomically, last): from now on the backup exists."""
        self._require_open()
        missing = [i for i, filled in enumerate(self._filled) if not filled]
        if missing:
            raise InvalidArgument(
                f"backup incomplete: {len(missing)} chunks never added (first: {missing[0]})"
            )
        created = self.repo.clock().astimezone(UTC)
        manifest = Manifest(
            id=self.repo.new_backup_id(created),
            created_at=created.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            size=self.size,
            chunk_size=self.repo.chunk_size,
            chunks=list(self._chunks),
            meta=_json_meta(self.meta),
            id_key=self.repo.key.id_key if self.repo.key else None,
        ).sealed()
        self.repo._write_manifest(manifest)
        self.close()
        return manifest
