"""The LUN registry of one array: its data directory, catalog and open LUNs.

Concurrency: all methods run on the daemon's event loop thread (the API's
handlers are ``async`` and the NBD server calls in from the same loop), so the
registry needs no locks.  The data directory is locked with ``flock`` so two
daemons can never serve the same LUNs.
"""

from __future__ import annotations

import fcntl
import logging
import os
import time
import uuid as uuidlib
from pathlib import Path

from lunseal.engine.catalog import Catalog
from lunseal.engine.file_backend import FileBackend
from lunseal.engine.lun import (
    MAX_LUN_NUMBER,
    Lun,
    LunRecord,
    validate_name,
    validate_number,
    validate_size,
)
from lunseal.engine.mirrors import MirrorSet
from lunseal.engine.state import LunState, StateTracker
from lunseal.errors import (
    BackendError,
    Conflict,
    DataDirLocked,
    InvalidArgument,
    LunsealError,
    NotFound,
)

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite"
LUN_DIR = "luns"
LOCK_FILE = "lock"


class Array:
    """Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, data_dir: Path, catalog: Catalog, lock_fd: int) -> None:
        self.data_dir = data_dir
        self.catalog = catalog
        self._lock_fd = lock_fd
        self._luns: dict[str, Lun] = {}
        self._trackers: dict[str, StateTracker] = {}  # by LUN UUID
        self.mirrors = MirrorSet(catalog.mirrors, self.lun_by_uuid)
        self.array_id = catalog.get_meta("array_id") or ""
        self.last_shutdown_clean = catalog.get_meta("clean_shutdown") != "0"

    @classmethod
    def open(cls, data_dir: Path) -> Array:
        data_dir = data_dir.resolve()
        (data_dir / LUN_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = _lock_data_dir(data_dir)
        try:
            catalog = Catalog(data_dir / CATALOG_FILE)
            if catalog.get_meta("array_id") is None:
                catalog.set_meta("array_id", str(uuidlib.uuid4()))
            array = cls(data_dir, catalog, lock_fd)
            array._load()
            array.mirrors.load()
            catalog.set_meta("clean_shutdown", "0")
        except BaseException:
            os.close(lock_fd)
            raise
        return array

    def _load(self) -> None:
        for rec in self.catalog.luns():
            backend = FileBackend(Path(rec.path))
            if backend.size != rec.size:
                log.warning(
                    "LUN %s: backing file %s is %d bytes, catalog says %d; serving %d",
                    rec.name,
                    rec.path,
                    backend.size,
                    rec.size,
                    rec.size,
                )
            lun = Lun(rec, backend)
            self._luns[rec.name] = lun
            self._attach_tracker(lun)

    def _attach_tracker(self, lun: Lun) -> StateTracker:
        """Hook state tracking into the LUN's change gate; recover its state."""
        store = self.catalog.states
        uuid = lun.record.uuid
        state = store.load_state(uuid) or LunState(uuid)
        tracker = StateTracker(lun, store, state, store.load_holds(uuid))
        tracker.recover()
        self._trackers[uuid] = tracker
        return tracker

    def lun_by_uuid(self, uuid: str) -> Lun | None:
        return next((lun for lun in self._luns.values() if lun.record.uuid == uuid), None)

    def tracker(self, name: str) -> StateTracker:
        return self._trackers[self.lun(name).record.uuid]

    def checkpoint(self, idle: float) -> None:
        """Record the exact state of every LUN whose changes have been idle ``idle`` s."""
        # One LUN's failure must not keep the others dirty; the caller logs and retries.
        first: LunsealError | None = None
        for tracker in self._trackers.values():
            try:
                tracker.checkpoint(idle)
            except LunsealError as exc:
                log.debug("LUN %s: checkpoint failed: %s", tracker.lun.name, exc.message)
                first = first or exc
        self.mirrors.checkpoint(idle)
        if first is not None:
            raise first

    def close(self) -> None:
        """Flush every LUN, record a clean shutdown and release the data directory."""
        for lun in self._luns.values():
            try:
                lun.flush()
            except BackendError as exc:
                log.error("flush of LUN %s failed at shutdown: %s", lun.name, exc.message)
                self.catalog.set_meta("clean_shutdown", "0")
                break
        else:
            self.mirrors.close()
            for tracker in self._trackers.values():
                tracker.close()
            self.catalog.set_meta("clean_shutdown", "1")
        self._trackers.clear()
        for lun in self._luns.values():
            lun.backend.close()
        self._luns.clear()
        self.catalog.close()
        os.close(self._lock_fd)

    # -- lookup ---------------------------------------------------------------

    def luns(self) -> list[Lun]:
        return sorted(self._luns.values(), key=lambda lun: lun.record.number)

    def lun(self, name: str) -> Lun:
        try:
            return self._luns[name]
        except KeyError:
            raise NotFound(f"no LUN named {name!r}") from None

    def find(self, name: str) -> Lun | None:
        return self._luns.get(name)

    def default_lun(self) -> Lun | None:
        """The export served under the empty name: LUN number 0, as in SCSI."""
        return next((lun for lun in self._luns.values() if lun.record.number == 0), None)

    # -- management -------------------------------------------------------------

    def create_lun(
        self,
        name: str,
        size: int | None,
        *,
        number: int | None = None,
        read_only: bool = False,
        path: Path | None = None,
    ) -> Lun:
        validate_name(name)
        if name in self._luns:
            raise Conflict(f"a LUN named {name!r} already exists")
        number = self._choose_number(number)
        lun_uuid = str(uuidlib.uuid4())
        backend, owned = self._open_backing(lun_uuid, size, path)
        rec = LunRecord(
            uuid=lun_uuid,
            name=name,
            number=number,
            size=backend.size,
            backend=backend.kind,
            path=str(backend.path),
            owned=owned,
            read_only=read_only,
            created_at=time.time(),
        )
        try:
            self.catalog.insert_lun(rec)
        except Exception:
            backend.close()
            if owned:
                backend.path.unlink(missing_ok=True)
            raise
        lun = Lun(rec, backend)
        self._luns[name] = lun
        self._attach_tracker(lun)
        log.info("created LUN %s (number %d, %d bytes, %s)", name, number, rec.size, rec.path)
        return lun

    def _choose_number(self, number: int | None) -> int:
        used = {lun.record.number for lun in self._luns.values()}
        if number is None:
            free = next((n for n in range(MAX_LUN_NUMBER + 1) if n not in used), None)
            if free is None:
                raise Conflict("no free LUN number left")
            return free
        validate_number(number)
        if number in used:
            raise Conflict(f"LUN number {number} is already in use")
        return number

    def _open_backing(
        self, lun_uuid: str, size: int | None, path: Path | None
    ) -> tuple[FileBackend, bool]:
        if path is None:
            if size is None:
                raise InvalidArgument("a size is required unless an existing file is given")
            target = self.data_dir / LUN_DIR / f"{lun_uuid}.img"
            return FileBackend(target, create_size=validate_size(size)), True
        if not path.is_absolute():
            raise InvalidArgument(f"backing file path must be absolute: {path}")
        if any(Path(lun.record.path) == path for lun in self._luns.values()):
            raise Conflict(f"{path} already backs another LUN")
        if path.exists():
            if not path.is_file():
                raise InvalidArgument(f"{path} is not a regular file")
            backend = FileBackend(path)
            try:
                if size is not None and size != backend.size:
                    raise InvalidArgument(
                        f"{path} is {backend.size} bytes, not {size}; omit the size to use the file"
                    )
                validate_size(backend.size)
            except InvalidArgument:
                backend.close()
                raise
            return backend, False
        if size is None:
            raise InvalidArgument(f"{path} does not exist; give a size to create it")
        return FileBackend(path, create_size=validate_size(size)), True

    def grow_lun(self, name: str, size: int) -> Lun:
        lun = self.lun(name)
        if mirrors := self.mirrors.of_lun(lun):
            raise Conflict(
                f"LUN {name} belongs to mirror {mirrors[0].name}; delete the mirror to resize"
            )
        old = lun.size
        lun.grow(size)
        self.catalog.update_lun(lun.record)
        log.info("grew LUN %s from %d to %d bytes", name, old, size)
        return lun

    def set_read_only(self, name: str, read_only: bool) -> Lun:
        lun = self.lun(name)
        lun.record = lun.record.with_changes(read_only=read_only)
        self.catalog.update_lun(lun.record)
        return lun

    def delete_lun(self, name: str, *, force: bool = False) -> None:
        lun = self.lun(name)
        if lun.users and not force:
            raise Conflict(
                f"LUN {name} is in use by {len(lun.users)} connection(s); "
                "disconnect them or delete with force"
            )
        mirrors = self.mirrors.of_lun(lun)
        if mirrors and not force:
            raise Conflict(
                f"LUN {name} belongs to mirror(s) {', '.join(m.name for m in mirrors)}; "
                "delete them first or delete with force"
            )
        for m in mirrors:
            self.mirrors.delete(m.name)
        lun.revoke_users(f"LUN {name} was deleted")
        self.catalog.delete_lun(lun.record.uuid)
        self.catalog.states.delete_lun(lun.record.uuid)
        self._trackers.pop(lun.record.uuid, None)
        del self._luns[name]
        lun.backend.close()
        if lun.record.owned:
            Path(lun.record.path).unlink(missing_ok=True)
        log.info("deleted LUN %s", name)


def _lock_data_dir(data_dir: Path) -> int:
    fd = os.open(data_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise DataDirLocked(
            f"data directory {data_dir} is in use by another lunseal daemon"
        ) from None
    return fd
