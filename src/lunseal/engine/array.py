"""The LUN registry of one array: its data directory, catalog and open LUNs.

Concurrency: the registry's methods run on the daemon's event loop thread (the
API's handlers are ``async`` and the NBD server calls in from the same loop), so
the registry itself needs no locks.  Each available LUN has its own
:class:`~lunseal.engine.worker.LunWorker` (``lun.worker``): host I/O, the state
tracker and flushes of that LUN run there, in order.  What the registry does to
a LUN's data or state (grow, flush, checkpoint) it runs on that worker too
(:meth:`Lun.run`); a LUN's worker is stopped, after draining, before its
backing file is closed, so no queued request ever sees a closed descriptor.

The data directory is locked with ``flock`` so two daemons can never serve the
same LUNs, and every backing file is locked while a LUN uses it (see
:mod:`lunseal.engine.backends.identity`).

A LUN whose backing file cannot be used at start-up (missing, refused, locked
elsewhere) is *unavailable*: it stays listed with the reason, refuses data and
state operations, and can be deleted or re-pointed at another file; the other
LUNs serve as usual.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import time
import uuid as uuidlib
from pathlib import Path

from lunseal.engine.backends import identity as backing
from lunseal.engine.backends.file import FileBackend
from lunseal.engine.backends.identity import (
    CATALOG_FILE,
    LUN_DIR,
    Holder,
    Identity,
    Placement,
    place,
)
from lunseal.engine.catalog import Catalog
from lunseal.engine.lun import (
    MAX_LUN_NUMBER,
    Lun,
    LunRecord,
    UnavailableBackend,
    validate_name,
    validate_number,
    validate_size,
)
from lunseal.engine.mirror.registry import MirrorSet
from lunseal.engine.state.tracker import LunState, StateTracker
from lunseal.engine.worker import LunWorker
from lunseal.errors import (
    BackendError,
    Conflict,
    DataDirLocked,
    InvalidArgument,
    LunsealError,
    NotFound,
)

log = logging.getLogger(__name__)

__all__ = ["CATALOG_FILE", "LOCK_FILE", "LUN_DIR", "Array"]

LOCK_FILE = "lock"


class Array:
    """Open with :meth:`open`; close with :meth:`close`."""

    def __init__(self, data_dir: Path, catalog: Catalog, lock_fd: int) -> None:
        self.data_dir = data_dir
        self.catalog = catalog
        self._lock_fd = lock_fd
        self._luns: dict[str, Lun] = {}
        self._trackers: dict[str, StateTracker] = {}  # by LUN UUID
        #: (st_dev, st_ino) of the backing file of every available LUN, by LUN UUID.
        self._identities: dict[str, Identity] = {}
        # Mirrors only ever see available LUNs: one with an unavailable leg is dropped.
        self.mirrors = MirrorSet(catalog.mirrors, self.lun_by_uuid)
        self.array_id = catalog.get_meta("array_id") or ""
        #: Where files named by a user (``path=``) may lie; ``None``: anywhere
        #: outside data directories (library use).  The daemon always sets it.
        self.allowed_backing_dirs: tuple[Path, ...] | None = None
        self.last_shutdown_clean = catalog.get_meta("clean_shutdown") != "0"

    @classmethod
    def open(cls, data_dir: Path) -> Array:
        data_dir = data_dir.resolve()
        (data_dir / LUN_DIR).mkdir(parents=True, exist_ok=True, mode=0o700)
        lock_fd = _lock_data_dir(data_dir)
        array: Array | None = None
        try:
            backing.mark_data_dir(data_dir)
            catalog = Catalog(data_dir / CATALOG_FILE)
            if catalog.get_meta("array_id") is None:
                catalog.set_meta("array_id", str(uuidlib.uuid4()))
            array = cls(data_dir, catalog, lock_fd)
            array._load()
            array.mirrors.load()
            catalog.set_meta("clean_shutdown", "0")
        except BaseException:
            if array is not None:
                array._close_backends()
            os.close(lock_fd)
            raise
        return array

    def _load(self) -> None:
        for rec in self.catalog.luns():
            try:
                backend = self._open_recorded(rec)
            except LunsealError as exc:
                log.error("LUN %s is unavailable: %s", rec.name, exc.message)
                backend_stub = UnavailableBackend(rec.name, rec.size, exc.message)
                self._luns[rec.name] = Lun(rec, backend_stub, unavailable=exc.message)
                continue
            if str(backend.path) != rec.path:
                log.warning("LUN %s: the data directory moved; now %s", rec.name, backend.path)
                rec = rec.with_changes(path=str(backend.path))
                self.catalog.update_lun_backing(rec)
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
            self._identities[rec.uuid] = backend.identity
            self._attach_tracker(lun)
            _start_worker(lun)

    def _attach_tracker(self, lun: Lun, *, recover: bool = True) -> StateTracker:
        """Hook state tracking into the LUN's change gate; recover its state.

        A re-pointed LUN skips recovery: the re-point itself gives the new epoch,
        with the reason the user needs to see.
        """
        store = self.catalog.states
        uuid = lun.record.uuid
        state = store.load_state(uuid) or LunState(uuid)
        tracker = StateTracker(lun, store, state, store.load_holds(uuid))
        if recover:
            tracker.recover()
        self._trackers[uuid] = tracker
        return tracker

    def _open_recorded(self, rec: LunRecord) -> FileBackend:
        """Open a catalogued LUN's file with the checks a new one gets."""
        path = Path(rec.path)
        own = self._own_file(rec.uuid)
        if rec.owned and path.name == own.name and path.parent.name == LUN_DIR:
            # A file the array created lives in *its* luns/, also after the data
            # directory was moved or copied: a copy never serves the original's file.
            return self._open_checked(own, rec.name, None)
        placement = place(path)
        if placement.identity is None:
            raise BackendError(f"backing file {path} does not exist")
        return self._open_checked(placement.path, rec.name, placement.identity)

    def _own_file(self, lun_uuid: str) -> Path:
        return self.data_dir / LUN_DIR / f"{lun_uuid}.img"

    def _open_checked(
        self,
        path: Path,
        lun_name: str,
        expect: Identity | None,
        *,
        create_size: int | None = None,
    ) -> FileBackend:
        """Open a backing file no other LUN uses and lock it for ``lun_name``."""
        backend = FileBackend(path, create_size=create_size, expect=expect)
        try:
            if not backend.regular:
                raise InvalidArgument(f"{path} is not a regular file")
            self._check_unused(path, backend.identity)
            if not backend.try_lock():
                raise Conflict(
                    f"backing file {path} is locked by "
                    f"{backing.describe_holder(backend.identity)}; a file can back only one LUN"
                )
        except BaseException:
            backend.close()
            if create_size is not None:
                path.unlink(missing_ok=True)
            raise
        backing.register(backend.identity, self._holder(lun_name))
        return backend

    def _check_unused(self, path: Path, identity: Identity) -> None:
        for uuid, used in self._identities.items():
            if used == identity:
                other = self.lun_by_uuid(uuid)
                name = other.name if other else uuid
                where = other.record.path if other else "?"
                raise Conflict(
                    f"{path} is the same file as the backing file of LUN {name} ({where})"
                )

    def _holder(self, lun_name: str) -> Holder:
        return Holder(str(self.data_dir), os.getpid(), lun_name)

    def _release_backing(self, lun: Lun) -> None:
        """Close the LUN's backing file (dropping its lock) and forget it."""
        lun.close_backend()
        identity = self._identities.pop(lun.record.uuid, None)
        if identity is not None:
            backing.unregister(identity, self._holder(lun.name))

    def _close_backends(self) -> None:
        for lun in self._luns.values():
            self._release_backing(lun)

    def lun_by_uuid(self, uuid: str) -> Lun | None:
        """An *available* LUN by UUID (unavailable ones have no data to offer)."""
        return next(
            (lun for lun in self._luns.values() if lun.record.uuid == uuid and lun.available),
            None,
        )

    def tracker(self, name: str) -> StateTracker:
        lun = self.lun(name)
        lun.require_available()
        return self._trackers[lun.record.uuid]

    def checkpoint(self, idle: float, lun: Lun | None = None) -> None:
        """Record the exact state of every LUN whose changes have been idle ``idle`` s.

        With ``lun``, only that LUN and the mirrors it is the source of: the
        daemon runs one such job per LUN on the LUN's worker, so the flush and
        catalog commit are ordered with the LUN's writes and stall no other LUN.
        """
        # One LUN's failure must not keep the others dirty; the caller logs and retries.
        first: LunsealError | None = None
        trackers = list(self._trackers.values())
        if lun is not None:
            trackers = [t for t in trackers if t.lun is lun]
        for tracker in trackers:
            try:
                tracker.lun.run(functools.partial(tracker.checkpoint, idle))
            except LunsealError as exc:
                log.debug("LUN %s: checkpoint failed: %s", tracker.lun.name, exc.message)
                first = first or exc
        self.mirrors.checkpoint(idle, lun)
        if first is not None:
            raise first

    def close(self) -> None:
        """Flush every LUN, record a clean shutdown and release the data directory."""
        # Workers finish what hosts queued first; after that this thread is the
        # only one touching LUNs, trackers and the catalog.
        for lun in self._luns.values():
            _stop_worker(lun)
        for lun in self._luns.values():
            if not lun.available:
                continue
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
        self._close_backends()
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
        backend, owned = self._open_backing(lun_uuid, name, size, path)
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
            backing.unregister(backend.identity, self._holder(name))
            if owned:
                backend.path.unlink(missing_ok=True)
            raise
        lun = Lun(rec, backend)
        self._luns[name] = lun
        self._identities[lun_uuid] = backend.identity
        self._attach_tracker(lun)
        _start_worker(lun)
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
        self, lun_uuid: str, name: str, size: int | None, path: Path | None
    ) -> tuple[FileBackend, bool]:
        if path is None:
            if size is None:
                raise InvalidArgument("a size is required unless an existing file is given")
            target = self._own_file(lun_uuid)
            return self._open_checked(target, name, None, create_size=validate_size(size)), True
        placement = self._place_allowed(path)
        if placement.identity is None:
            if size is None:
                raise InvalidArgument(f"{path} does not exist; give a size to create it")
            created = self._open_checked(
                placement.path, name, None, create_size=validate_size(size)
            )
            return created, True
        backend = self._open_checked(placement.path, name, placement.identity)
        try:
            if size is not None and size != backend.size:
                raise InvalidArgument(
                    f"{path} is {backend.size} bytes, not {size}; omit the size to use the file"
                )
            validate_size(backend.size)
        except InvalidArgument:
            backend.close()
            backing.unregister(backend.identity, self._holder(name))
            raise
        return backend, False

    def grow_lun(self, name: str, size: int) -> Lun:
        lun = self.lun(name)
        lun.require_available()
        if mirrors := self.mirrors.of_lun(lun):
            raise Conflict(
                f"LUN {name} belongs to mirror {mirrors[0].name}; delete the mirror to resize"
            )
        old = lun.size
        lun.run(lambda: lun.grow(size))
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
        # Requests already queued finish (their replies are dropped) before the
        # file closes: a worker never reads from a closed or reused descriptor.
        _stop_worker(lun)
        self.catalog.delete_lun(lun.record.uuid)  # its state and holds go with it
        self._trackers.pop(lun.record.uuid, None)
        del self._luns[name]
        self._release_backing(lun)
        if lun.record.owned and lun.available:
            Path(lun.record.path).unlink(missing_ok=True)
        elif lun.record.owned:
            # Never remove a file this array could not use: it may be in use elsewhere.
            log.warning("LUN %s was unavailable; its file %s was left alone", name, lun.record.path)
        log.info("deleted LUN %s", name)

    def _place_allowed(self, path: Path) -> Placement:
        """:func:`place`, and the file's real directory lies under an allowed one.

        Checked on the resolved directory, so ``..`` or a symlinked directory
        cannot lead out of an allowed directory."""
        placement = place(path)
        allowed = self.allowed_backing_dirs
        if allowed is not None and not any(
            placement.path.parent.is_relative_to(d) for d in allowed
        ):
            where = ", ".join(str(d) for d in allowed) or "none configured"
            raise InvalidArgument(
                f"{path} is outside the allowed backing directories ({where}); an administrator "
                "may allow its directory with allowed_backing_dirs in the configuration file "
                "or --allow-backing-dir"
            )
        return placement

    def repoint_lun(self, name: str, path: Path) -> Lun:
        """Serve the LUN from another existing file of its size (data-changing, C1).

        Meant for an unavailable LUN; an available one must have no connections
        and belong to no mirror.  Its old file is kept.
        """
        lun = self.lun(name)
        if lun.users:
            raise Conflict(
                f"LUN {name} is in use by {len(lun.users)} connection(s); disconnect them first"
            )
        if mirrors := self.mirrors.of_lun(lun):
            raise Conflict(f"LUN {name} belongs to mirror {mirrors[0].name}; delete it first")
        placement = self._place_allowed(path)
        if placement.identity is None:
            raise InvalidArgument(
                f"{path} does not exist; re-point a LUN at an existing file of {lun.size} bytes"
            )
        if self._identities.get(lun.record.uuid) == placement.identity:
            raise InvalidArgument(f"LUN {name} already uses {path}")
        backend = self._open_checked(placement.path, name, placement.identity)
        if backend.size != lun.size:
            backend.close()
            backing.unregister(backend.identity, self._holder(name))
            raise InvalidArgument(
                f"{path} is {backend.size} bytes but LUN {name} is {lun.size} bytes; "
                "re-point it at a file of the same size"
            )
        self._swap_backing(lun, backend)
        log.info("LUN %s re-pointed to %s", name, placement.path)
        return lun

    def _swap_backing(self, lun: Lun, backend: FileBackend) -> None:
        old_path = lun.record.path
        if lun.available:
            lun.run(lun.flush)  # what was written to the old file stays there, durably
        _stop_worker(lun)
        self._release_backing(lun)
        lun.swap_backend(backend)
        lun.unavailable = ""
        self._identities[lun.record.uuid] = backend.identity
        tracker = self._trackers.get(lun.record.uuid) or self._attach_tracker(lun, recover=False)
        # The state changes (durably) before the catalog points at the new file:
        # a crash in between reports "changed", never a false "intact".
        tracker.repointed(f"the LUN was re-pointed from {old_path} to {backend.path}")
        lun.record = lun.record.with_changes(path=str(backend.path), owned=False)
        self.catalog.update_lun_backing(lun.record)
        _start_worker(lun)


def _start_worker(lun: Lun) -> None:
    if lun.worker is None:
        lun.worker = LunWorker(lun.name)


def _stop_worker(lun: Lun) -> None:
    """Drain and end the LUN's worker; its callers run inline from here on."""
    worker, lun.worker = lun.worker, None
    if worker is not None:
        worker.stop()


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
