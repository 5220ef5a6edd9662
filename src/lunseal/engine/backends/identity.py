"""Backing storage: what a backing file *is*, and who may use it.

A backing file is identified by its device and inode, never by its name: a
``..`` path, a symlinked directory or a hard link all name one file, and two
LUNs writing one file would leave each other's state token "intact" (C1).
Three rules follow:

* :func:`place` checks a user-given path before anything opens it: absolute,
  its directory exists and lies in no lunseal data directory (this array's or
  another's, recognised by a marker file), and the file itself, if present, is
  a regular file and not a symlink.  The caller opens it with ``O_NOFOLLOW``
  and compares the opened file with the identity found here, so a file swapped
  in between is refused.
* An array serves each (device, inode) at most once.
* While a LUN uses a file, the array holds an exclusive open-file-description
  lock on it (``F_OFD_SETLK``), so a second array or daemon on this machine
  cannot serve it at the same time.  OFD locks do not record who holds them,
  so each holder also leaves a small note in a registry directory; the error a
  refused array shows names the data directory, daemon pid and LUN from it.
"""

from __future__ import annotations

import json
import logging
import os
import stat
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from lunseal.errors import InvalidArgument
from lunseal.fsutil import atomic_write_json

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
LUN_DIR = "luns"
#: Written into every data directory so any array recognises it as one.
DATA_DIR_MARKER = ".lunseal-data-dir"
#: Overrides where lock holders leave their notes (tests, unusual setups).
REGISTRY_ENV = "LUNSEAL_LOCK_REGISTRY"

#: A file's identity: (st_dev, st_ino).
Identity = tuple[int, int]


def mark_data_dir(data_dir: Path) -> None:
    marker = data_dir / DATA_DIR_MARKER
    if not marker.exists():
        marker.write_text(
            "lunseal data directory: no file below this directory may back a LUN "
            "other than the ones this array created itself.\n"
        )


def is_data_dir(directory: Path) -> bool:
    # The catalog plus luns/ also catches data directories of older releases.
    return (directory / DATA_DIR_MARKER).exists() or (
        (directory / CATALOG_FILE).exists() and (directory / LUN_DIR).is_dir()
    )


def enclosing_data_dir(directory: Path) -> Path | None:
    """The lunseal data directory ``directory`` (already resolved) lies in, if any."""
    return next((d for d in (directory, *directory.parents) if is_data_dir(d)), None)


@dataclass(frozen=True)
class Placement:
    #: The path with its directory resolved (no symlinks, no ``..``).
    path: Path
    #: (st_dev, st_ino) of the existing file; ``None`` if there is no file yet.
    identity: Identity | None


def place(path: Path) -> Placement:
    """Check a user-given backing-file path before anything opens or creates it."""
    if not path.is_absolute():
        raise InvalidArgument(f"backing file path must be absolute: {path}")
    if path.name in ("", ".", ".."):
        raise InvalidArgument(f"{path} does not name a file")
    try:
        directory = path.parent.resolve(strict=True)
    except OSError as exc:
        raise InvalidArgument(
            f"directory {path.parent} of the backing file cannot be used: {exc.strerror or exc}"
        ) from None
    if not directory.is_dir():
        raise InvalidArgument(f"{path.parent} is not a directory")
    owner = enclosing_data_dir(directory)
    if owner is not None:
        raise InvalidArgument(
            f"{path} is inside the lunseal data directory {owner}; files there belong to "
            "that array and can never back another LUN"
        )
    canonical = directory / path.name
    try:
        st = os.lstat(canonical)
    except FileNotFoundError:
        return Placement(canonical, None)
    except OSError as exc:
        raise InvalidArgument(f"cannot inspect {path}: {exc.strerror or exc}") from None
    if stat.S_ISLNK(st.st_mode):
        raise InvalidArgument(f"{path} is a symbolic link; give the path of the file itself")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path} is not a regular file")
    return Placement(canonical, (st.st_dev, st.st_ino))


# -- who holds a backing file's lock -------------------------------------------------


@dataclass(frozen=True)
class Holder:
    data_dir: str
    pid: int
    lun: str


def registry_dir() -> Path:
    chosen = os.environ.get(REGISTRY_ENV)
    if chosen:
        return Path(chosen)
    if os.access("/run", os.W_OK):
        return Path("/run/lunseal/backing-locks")
    return Path(tempfile.gettempdir()) / f"lunseal-backing-locks-{os.getuid()}"


def _note(identity: Identity) -> Path:
    return registry_dir() / f"{identity[0]}-{identity[1]}.json"


def register(identity: Identity, holder: Holder) -> None:
    """Leave a note saying who holds the lock; best effort (the lock is what counts)."""
    try:
        note = _note(identity)
        note.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        atomic_write_json(note, asdict(holder), mode=0o644)
    except OSError as exc:
        log.warning("cannot record the holder of a backing-file lock: %s", exc)


def unregister(identity: Identity, holder: Holder) -> None:
    note = _note(identity)
    if _read_note(note) == holder:
        note.unlink(missing_ok=True)


def _read_note(note: Path) -> Holder | None:
    try:
        data = json.loads(note.read_text())
        return Holder(str(data["data_dir"]), int(data["pid"]), str(data["lun"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def describe_holder(identity: Identity) -> str:
    """Who holds the lock on the file, as far as the registry knows."""
    holder = _read_note(_note(identity))
    if holder is None:
        return "another process (not one that registered as a lunseal array)"
    who = f"the lunseal array in {holder.data_dir} (daemon pid {holder.pid}, LUN {holder.lun})"
    if not _alive(holder.pid):
        who += "; that process has exited, so a process it started may still hold the lock"
    return who


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
