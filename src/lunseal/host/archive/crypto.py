"""Encryption at rest for the archive: keyed chunk ids and sealed objects.

An encrypted repository has one random 32-byte master secret.  Two keys are
derived from it (BLAKE3 in key-derivation mode, so neither reveals the other):

* the *id key*: chunk ids are ``blake3(data, key=id_key)``, so an id says
  nothing about the data (no "is this known file in the backup?" probing) and
  nobody without the key can name a chunk for data of their choice;
* the *sealing key*: every chunk and manifest is AES-256-GCM encrypted with a
  fresh random nonce and the object's kind and name as associated data, so an
  object moved under another name (a swapped chunk, another backup's manifest)
  fails authentication just like a forged or damaged one.

The master secret is stored only wrapped: AES-256-GCM under a key that
Argon2id (memory-hard, parameters stored beside it) derives from the
passphrase.  That wrapped form is the *key file*; ``repokey`` keeps it in the
repository (object ``key``), ``keyfile`` keeps it outside.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import blake3
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id

from lunseal.errors import ArchiveCorrupt, InvalidArgument, Unauthorized

#: How the master secret is kept: in the repository, in a file outside it, or no encryption.
ENCRYPTION_MODES = ("repokey", "keyfile", "none")
KEY_FORMAT = "lunseal-archive-key"
KEY_VERSION = 1
#: A key file is a few hundred bytes; anything much larger is not one.
KEY_FILE_MAX = 64 * 1024
#: RFC 9106's second recommended Argon2id setting: 64 MiB, 3 passes, 4 lanes.
DEFAULT_KDF = {"iterations": 3, "lanes": 4, "memory_kib": 64 * 1024}
# Bounds on stored KDF parameters: a forged key file must not make us allocate
# gigabytes or spin for hours before the passphrase is even checked.
_KDF_LIMITS = {"iterations": (1, 64), "lanes": (1, 64), "memory_kib": (8, 4 * 1024 * 1024)}

_ID_CONTEXT = "lunseal archive 2026-12 chunk id key"
_SEAL_CONTEXT = "lunseal archive 2026-12 object sealing key"
# Magic + envelope version + nonce, then ciphertext and the 16-byte GCM tag.
_ENVELOPE = struct.Struct("<7sB12s")
_ENVELOPE_MAGIC = b"LSCRYPT"
_ENVELOPE_VERSION = 1
_TAG_SIZE = 16
_REPO_ID_RE = re.compile(r"^[0-9a-f]{32}$")


def new_repository_id() -> str:
    return os.urandom(16).hex()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: Any) -> bytes:
    if not isinstance(text, str):
        raise ValueError("expected base64 text")
    return base64.b64decode(text, validate=True)


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


class ArchiveKey:
    """The unlocked secrets of one encrypted repository."""

    def __init__(self, repository: str, chunk_size: int, master: bytes) -> None:
        if len(master) != 32:
            raise ValueError("the master secret is 32 bytes")
        self.repository = repository
        self.chunk_size = chunk_size
        self.master = master
        self.id_key = blake3.blake3(master, derive_key_context=_ID_CONTEXT).digest()
        self._aead = AESGCM(blake3.blake3(master, derive_key_context=_SEAL_CONTEXT).digest())

    @classmethod
    def generate(cls, repository: str, chunk_size: int) -> ArchiveKey:
        return cls(repository, chunk_size, os.urandom(32))

    def __repr__(self) -> str:  # never the secrets, not even in a traceback
        return f"ArchiveKey(repository={self.repository!r})"

    def chunk_id(self, data: bytes) -> str:
        return blake3.blake3(data, key=self.id_key).hexdigest()

    def _aad(self, kind: str, name: str) -> bytes:
        return f"{self.repository}\0{kind}\0{name}".encode()

    def seal(self, kind: str, name: str, plaintext: bytes) -> bytes:
        """Encrypt ``plaintext`` bound to this repository, the object's kind and its name."""
        nonce = os.urandom(12)
        header = _ENVELOPE.pack(_ENVELOPE_MAGIC, _ENVELOPE_VERSION, nonce)
        return header + self._aead.encrypt(nonce, plaintext, header + self._aad(kind, name))

    def unseal(self, kind: str, name: str, blob: bytes) -> tuple[str | None, bytes]:
        """(problem or None, plaintext): the object must be exactly what :meth:`seal` made."""
        if len(blob) < _ENVELOPE.size + _TAG_SIZE:
            return "truncated", b""
        magic, version, nonce = _ENVELOPE.unpack_from(blob)
        if magic != _ENVELOPE_MAGIC:
            return "not an encrypted lunseal object (forged or replaced)", b""
        if version != _ENVELOPE_VERSION:
            return f"unknown envelope version {version}", b""
        header = blob[: _ENVELOPE.size]
        try:
            plain = self._aead.decrypt(
                nonce, blob[_ENVELOPE.size :], header + self._aad(kind, name)
            )
        except InvalidTag:
            return "authentication failed (forged, swapped or damaged)", b""
        return None, plain


@dataclass(frozen=True)
class Kdf:
    """Argon2id parameters; stored in the key file so it can be unlocked later."""

    salt: bytes
    iterations: int
    lanes: int
    memory_kib: int

    @classmethod
    def new(cls, **params: int) -> Kdf:
        return cls(salt=os.urandom(16), **{**DEFAULT_KDF, **params})

    def to_json(self) -> dict[str, Any]:
        return {
            "name": "argon2id",
            "salt": _b64(self.salt),
            "iterations": self.iterations,
            "lanes": self.lanes,
            "memory_kib": self.memory_kib,
        }

    @classmethod
    def from_json(cls, obj: Any) -> Kdf:
        if not isinstance(obj, dict) or obj.get("name") != "argon2id":
            raise ValueError("unknown key derivation function")
        params = {}
        for name, (low, high) in _KDF_LIMITS.items():
            value = obj.get(name)
            if not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"KDF parameter {name} out of range")
            params[name] = value
        if params["memory_kib"] < 8 * params["lanes"]:
            raise ValueError("KDF memory too small for its lanes")
        return cls(salt=_unb64(obj.get("salt")), **params)

    def derive(self, passphrase: str) -> bytes:
        return Argon2id(
            salt=self.salt,
            length=32,
            iterations=self.iterations,
            lanes=self.lanes,
            memory_cost=self.memory_kib,
        ).derive(passphrase.encode())


def wrap_key(key: ArchiveKey, passphrase: str, kdf: Kdf | None = None) -> bytes:
    """The key file: the master secret encrypted under the passphrase."""
    if not passphrase:
        raise InvalidArgument("an encrypted archive needs a non-empty passphrase")
    kdf = kdf or Kdf.new()
    header = {
        "format": KEY_FORMAT,
        "version": KEY_VERSION,
        "repository": key.repository,
        "kdf": kdf.to_json(),
        "cipher": "aes-256-gcm",
    }
    secret = _canonical(
        {"master": _b64(key.master), "repository": key.repository, "chunk_size": key.chunk_size}
    )
    nonce = os.urandom(12)
    wrapped = AESGCM(kdf.derive(passphrase)).encrypt(nonce, secret, _canonical(header))
    body = {**header, "nonce": _b64(nonce), "secret": _b64(wrapped)}
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


def key_file_repository(blob: bytes) -> str:
    """The repository id a key file names (read without the passphrase)."""
    return _parse_key_file(blob)[0]["repository"]  # type: ignore[no-any-return]


def _parse_key_file(blob: bytes) -> tuple[dict[str, Any], Kdf, bytes, bytes]:
    """(header, kdf, nonce, wrapped secret); damage raises :class:`ArchiveCorrupt`."""
    try:
        if len(blob) > KEY_FILE_MAX:
            raise ValueError("too large")
        obj = json.loads(blob)
        if not isinstance(obj, dict) or obj.get("format") != KEY_FORMAT:
            raise ValueError("not a lunseal archive key")
        if obj.get("version") != KEY_VERSION or obj.get("cipher") != "aes-256-gcm":
            raise ValueError(f"unsupported key version {obj.get('version')!r}")
        if not isinstance(obj.get("repository"), str) or not _REPO_ID_RE.match(obj["repository"]):
            raise ValueError("no valid repository id")
        kdf = Kdf.from_json(obj.get("kdf"))
        nonce, wrapped = _unb64(obj.get("nonce")), _unb64(obj.get("secret"))
        if len(nonce) != 12:
            raise ValueError("bad nonce")
    except (ValueError, binascii.Error) as exc:
        raise ArchiveCorrupt(f"archive key unreadable: {exc}") from None
    header = {k: obj[k] for k in ("format", "version", "repository", "kdf", "cipher")}
    return header, kdf, nonce, wrapped


def unwrap_key(blob: bytes, passphrase: str) -> ArchiveKey:
    """Unlock a key file; a wrong passphrase raises :class:`Unauthorized`."""
    header, kdf, nonce, wrapped = _parse_key_file(blob)
    try:
        secret = json.loads(
            AESGCM(kdf.derive(passphrase)).decrypt(nonce, wrapped, _canonical(header))
        )
    except InvalidTag:
        raise Unauthorized(
            "cannot unlock the archive key: wrong passphrase (or the key was damaged or replaced)"
        ) from None
    try:
        master = _unb64(secret["master"])
        if secret["repository"] != header["repository"] or not isinstance(
            secret["chunk_size"], int
        ):
            raise ValueError("inconsistent")
        return ArchiveKey(header["repository"], secret["chunk_size"], master)
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise ArchiveCorrupt(f"archive key content unreadable: {exc}") from None


@dataclass(frozen=True)
class Unlock:
    """What the user gave to open an encrypted archive (from the environment or files)."""

    passphrase: str | None = None
    key_file: Path | None = None

    @property
    def given(self) -> bool:
        return bool(self.passphrase) or self.key_file is not None


def default_key_dir() -> Path:
    """Where ``keyfile`` keys live unless a path is given (as borg keeps them in ~/.config)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "lunseal" / "keys"


def default_key_file(repository: str) -> Path:
    return default_key_dir() / f"archive-{repository}.key"


def read_key_file(path: Path) -> bytes:
    try:
        with path.open("rb") as f:
            blob = f.read(KEY_FILE_MAX + 1)
    except FileNotFoundError:
        raise Unauthorized(f"archive key file {path} does not exist") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot read archive key file {path}: {exc}") from None
    if len(blob) > KEY_FILE_MAX:
        raise InvalidArgument(f"{path} is too large to be an archive key file")
    return blob


def write_key_file(path: Path, blob: bytes, *, overwrite: bool = False) -> None:
    """Write a key file readable only by its owner; never silently replace another key."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(path, flags, 0o600)
    except FileExistsError:
        raise InvalidArgument(f"{path} already exists: not overwriting a key") from None
    except OSError as exc:
        raise InvalidArgument(f"cannot write archive key file {path}: {exc}") from None
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(blob)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
