"""Where archive objects live: a flat key/value blob store.

The repository only needs what an object store offers (whole-object put/get,
prefix listing, delete), so a cloud backend can replace :class:`LocalStorage`
later without touching the repository logic.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path

from lunseal.errors import BackendError, Conflict, InvalidArgument, NotFound
from lunseal.fsutil import fsync_dir

# Segments never start with "." so keys cannot escape the root ("..") and can
# never collide with temporary files or the lock file, which all start with ".".
_KEY_RE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]*(/[A-Za-z0-9_-][A-Za-z0-9._-]*)*$")
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = ".lock"


def check_key(key: str) -> str:
    if not _KEY_RE.match(key):
        raise InvalidArgument(f"invalid archive object key {key!r}")
    return key


class Storage(ABC):
    """A flat key/value blob store; keys are ``/``-separated names like ``chunks/ab/abcd``."""

    @abstractmethod
    def put(self, key: str, data: bytes) -> None:
        """Store ``data`` atomically: readers see all of it or nothing, even after a crash."""

    @abstractmethod
    def get(self, key: str) -> bytes:
        """Return the object; raise :class:`NotFound` if there is none."""

    @abstractmethod
    def exists(self, key: str) -> bool: ...

    @abstractmethod
    def size(self, key: str) -> int:
        """Stored size in bytes (for prune's "bytes freed"); :class:`NotFound` if missing."""

    @abstractmethod
    def list(self, prefix: str) -> list[str]:
        """Sorted keys starting with ``prefix``; never objects still being written."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the object; deleting a missing key is not an error (as in object stores)."""

    @abstractmethod
    def lock(
        self, *, exclusive: bool, timeout: float = 0.0
    ) -> contextlib.AbstractContextManager[None]:
        """Hold the repository lock: backups share it, prune needs it alone.

        Raise :class:`Conflict` if it cannot be had within ``timeout`` seconds.
        """

    def sweep(self, older_than: float) -> int:
        """Remove leftovers of interrupted puts older than ``older_than`` seconds.

        Object stores never expose partial uploads, so the default has nothing to do.
        """
        return 0


class LocalStorage(Storage):
    """Objects as files under ``root``; every put is temp file + fsync + rename + fsync dir."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        self._make_dirs(path.parent)
        # A unique temp name per put: concurrent writers of the same key (two
        # backups storing the same chunk) must not truncate each other's file.
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            self._write_new(tmp, data)
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise BackendError.from_os_error(f"cannot store archive object {key}", exc) from exc

    @staticmethod
    def _write_new(path: Path, data: bytes) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make_dirs(self, directory: Path) -> None:
        """Create missing directories (0700) and fsync each parent so they survive a crash."""
        if directory.is_dir():
            return
        if directory == self.root:
            raise NotFound(f"archive directory {self.root} does not exist")
        self._make_dirs(directory.parent)
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
            directory.chmod(0o700)
            fsync_dir(directory.parent)

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise NotFound(f"archive object {key} does not exist") from None
        except OSError as exc:
            raise BackendError.from_os_error(f"cannot read archive object {key}", exc) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"archive object {key} does not exist") from None

    def list(self, prefix: str) -> list[str]:
        # Walk only the directory the prefix names, not the whole repository.
        base = self.root / prefix.rpartition("/")[0] if "/" in prefix else self.root
        keys = [key for key in self._walk(base) if key.startswith(prefix)]
        return sorted(keys)

    def _walk(self, base: Path) -> Iterator[str]:
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel = Path(dirpath).relative_to(self.root)
            for name in filenames:
                if not name.startswith("."):  # temp files and the lock file
                    yield (rel / name).as_posix()

    def delete(self, key: str) -> None:
        path = self._path(key)
        try:
            path.unlink(missing_ok=True)
            fsync_dir(path.parent)
        except FileNotFoundError:
            pass  # the directory itself is gone: nothing to delete
        except OSError as exc:
            raise BackendError.from_os_error(f"cannot delete archive object {key}", exc) from exc

    @contextlib.contextmanager
    def lock(self, *, exclusive: bool, timeout: float = 0.0) -> Iterator[None]:
        # flock dies with its process, so a SIGKILLed backup never blocks prune.
        try:
            fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except FileNotFoundError:
            raise NotFound(f"archive directory {self.root} does not exist") from None
        try:
            self._flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH, timeout)
            yield
        finally:
            os.close(fd)

    def _flock(self, fd: int, operation: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, operation | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    what = (
                        "a backup is running" if operation == fcntl.LOCK_EX else "prune is running"
                    )
                    raise Conflict(f"archive {self.root} is busy: {what}") from None
                time.sleep(0.05)

    def sweep(self, older_than: float) -> int:
        cutoff = time.time() - older_than
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                path = Path(dirpath) / name
                if name.startswith(".") and name.endswith(_TMP_SUFFIX):
                    with contextlib.suppress(FileNotFoundError):
                        if path.stat().st_mtime <= cutoff:
                            path.unlink()
                            removed += 1
        return removed
