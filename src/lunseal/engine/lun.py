"""A LUN and its single entry point for every data operation.

Every data-changing operation (write, trim, zero, grow) passes through
:meth:`Lun._accept_change` *before* the backend is touched.  Change listeners
(the state tracker, change maps, mirror fan-out) hook in there, so nothing can
modify a LUN's data without them seeing it first.

The gate is enforced, not a convention: the backend is private (``_backend``);
everyone else gets :attr:`Lun.backend`, a :class:`BackendView` that can read,
send zero-copy, report extents and stamps and flush, but has no way to write.
Layers (the mirror fan-out, test fault layers) are pushed and popped through
the LUN (:meth:`Lun.push_layer`), so they sit *behind* the gate too.
``tests/engine/test_gate.py`` fails if code outside the engine's LUN, layer and
backend modules reaches a backend object.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from time import perf_counter
from typing import Protocol, TypeVar

from lunseal.engine.backends.base import Backend, Extent, FileSlice, FileStamp
from lunseal.engine.worker import LunWorker
from lunseal.errors import InvalidArgument, LunUnavailable, NoSpace, OutOfRange, ReadOnly
from lunseal.metrics import Latency, new_latencies

NAME_MAX = 64
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: "$" would accept "x\n"
SECTOR = 512
MAX_LUN_SIZE = 1 << 50  # 1 PiB: far beyond anything here, small enough to catch typos
MAX_LUN_NUMBER = 16383  # the SAM flat-space addressing limit, for a later iSCSI target

T = TypeVar("T")

#: Called as ``listener(lun, offset, length)`` when a change is accepted.
ChangeListener = Callable[["Lun", int, int], None]
#: Called as ``hook(lun)`` once the backend has made a change (or failed to, or
#: a listener refused it).
ChangeDone = Callable[["Lun"], None]


class BatchHook(Protocol):
    """Told when a batch of operations (:meth:`Lun.batch`) starts and ends, so it
    can do once per batch what would otherwise cost something per change."""

    def begin_batch(self) -> None: ...

    def end_batch(self) -> None: ...


L = TypeVar("L", bound=Backend)


class BackendView:
    """The read side of a LUN's backend: what front ends and mirror copies may
    use without passing the change gate (none of it changes data)."""

    __slots__ = ("_lun",)

    def __init__(self, lun: Lun) -> None:
        self._lun = lun

    @property
    def size(self) -> int:
        return self._lun._backend.size

    @property
    def kind(self) -> str:
        return self._lun._backend.kind

    def read(self, offset: int, length: int) -> bytes:
        return self._lun._backend.read(offset, length)

    def read_slice(self, offset: int, length: int) -> bytes | FileSlice:
        return self._lun._backend.read_slice(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self._lun._backend.extents(offset, length)

    def stamp(self) -> FileStamp | None:
        return self._lun._backend.stamp()

    def cache(self, offset: int, length: int) -> None:
        self._lun._backend.cache(offset, length)

    def flush(self) -> None:
        """Durability only: a flush changes no data, so it needs no gate."""
        self._lun._backend.flush()

    def flush_own(self) -> None:
        """Flush the LUN's own data only: a mirror's fan-out layer would also flush
        its legs, which each mirror's checkpoint flushes itself."""
        backend = self._lun._backend
        getattr(backend, "flush_own", backend.flush)()


def validate_name(name: str) -> str:
    if not name or len(name) > NAME_MAX or not _NAME_RE.fullmatch(name):
        raise InvalidArgument(
            f"invalid LUN name {name!r}: use 1-{NAME_MAX} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def validate_size(size: int) -> int:
    if size <= 0 or size % SECTOR:
        raise InvalidArgument(f"invalid size {size}: must be a positive multiple of {SECTOR}")
    if size > MAX_LUN_SIZE:
        raise InvalidArgument(f"invalid size {size}: the maximum is 1P")
    return size


def validate_number(number: int) -> int:
    if not 0 <= number <= MAX_LUN_NUMBER:
        raise InvalidArgument(f"invalid LUN number {number}: must be 0-{MAX_LUN_NUMBER}")
    return number


@dataclass(frozen=True)
class LunRecord:
    """What the catalog stores about a LUN."""

    uuid: str
    name: str
    number: int
    size: int
    backend: str
    path: str
    owned: bool  # lunseal created the backing file and deletes it with the LUN
    read_only: bool
    created_at: float

    def with_changes(self, **changes: object) -> LunRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


class LunUser(Protocol):
    """Something that has a LUN open (an NBD connection) and can be told to let go."""

    def revoke(self, reason: str) -> None: ...


@dataclass
class LunStats:
    reads: int = 0
    writes: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    trims: int = 0
    zeroes: int = 0
    flushes: int = 0
    #: Time in the backend per operation, by "read", "write", "flush" (metrics).
    latency: dict[str, Latency] = field(default_factory=new_latencies)


@dataclass
class Lun:
    record: LunRecord
    #: Private: writing to it directly would bypass the change gate (C1, C2).
    _backend: Backend
    users: set[LunUser] = field(default_factory=set)
    listeners: list[ChangeListener] = field(default_factory=list)
    #: After each change the backend made: the state tracker notes the backing
    #: file's stamp, so a change by another process shows later.
    change_done: list[ChangeDone] = field(default_factory=list)
    #: Told when a batch starts and ends (see :meth:`batch`).
    batch_hooks: list[BatchHook] = field(default_factory=list)
    stats: LunStats = field(default_factory=LunStats)
    #: Why hosts may not write this LUN right now besides its read-only flag
    #: (e.g. it is the target of a synchronised mirror), by owner.
    write_guards: dict[str, str] = field(default_factory=dict)
    #: Why the LUN cannot serve at all (backing file missing, locked elsewhere,
    #: refused); empty while it is available.  Its backend is then an
    #: :class:`UnavailableBackend`.
    unavailable: str = ""
    #: The thread that runs this LUN's data operations, state changes and
    #: flushes in order (set by the :class:`~lunseal.engine.array.Array` while
    #: the LUN is available; ``None`` runs them on the caller's thread).
    worker: LunWorker | None = None

    @property
    def backend(self) -> BackendView:
        """The backend, read-only (see :class:`BackendView`)."""
        return BackendView(self)

    # -- layers (behind the gate) ---------------------------------------------------

    def push_layer(self, make: Callable[[Backend], L]) -> L:
        """Wrap the backend in a layer made from it; writes pass the gate, then it."""
        layer = make(self._backend)
        self._backend = layer
        return layer

    def top_layer(self, kind: type[L]) -> L | None:
        """The outermost layer if it is a ``kind``."""
        return self._backend if isinstance(self._backend, kind) else None

    def pop_layer(self, layer: Backend) -> None:
        """Remove the outermost layer, which must be ``layer``."""
        inner = getattr(layer, "inner", None)
        if self._backend is not layer or not isinstance(inner, Backend):
            raise InvalidArgument(f"{type(layer).__name__} is not LUN {self.name}'s top layer")
        self._backend = inner

    def swap_backend(self, backend: Backend) -> Backend:
        """Serve from another backend (the array's re-point); returns the old one."""
        old, self._backend = self._backend, backend
        return old

    def close_backend(self) -> None:
        self._backend.close()

    def run(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the LUN's worker and wait for it (inline without one)."""
        return fn() if self.worker is None else self.worker.call(fn)

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def size(self) -> int:
        return self.record.size

    @property
    def read_only(self) -> bool:
        """Whether hosts may not write: the flag, or a guard such as a mirror's."""
        return self.record.read_only or bool(self.write_guards)

    @property
    def available(self) -> bool:
        return not self.unavailable

    def require_available(self) -> None:
        if self.unavailable:
            raise LunUnavailable(f"LUN {self.name} is unavailable: {self.unavailable}")

    # -- checks -------------------------------------------------------------

    def check_read_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.record.size:
            raise OutOfRange(
                f"range {offset}+{length} is beyond the end of LUN {self.name} "
                f"({self.record.size} bytes)"
            )

    def _check_write(self, offset: int, length: int) -> None:
        if self.record.read_only:
            raise ReadOnly(f"LUN {self.name} is read-only")
        if self.write_guards:
            reason = next(iter(self.write_guards.values()))
            raise ReadOnly(f"LUN {self.name} is read-only for hosts: {reason}")
        self._check_range(offset, length)

    def _check_range(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.record.size:
            raise NoSpace(
                f"write {offset}+{length} is beyond the end of LUN {self.name} "
                f"({self.record.size} bytes)"
            )

    def _accept_change(self, offset: int, length: int) -> None:
        """The one gate every data change passes, before the backend is touched."""
        for listener in self.listeners:
            listener(self, offset, length)

    def _done(self) -> None:
        for hook in self.change_done:
            hook(self)

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Run several operations back to back as one batch (a front end's
        receive).  Every change still passes the gate one by one; batch hooks
        may do their bookkeeping once per batch (the state tracker takes the
        backing file's stamp once, at the end)."""
        hooks = self.batch_hooks
        for hook in hooks:
            hook.begin_batch()
        try:
            yield
        finally:
            for hook in reversed(hooks):
                hook.end_batch()

    # -- data path ------------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        self.check_read_range(offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        start = perf_counter()
        data = self._backend.read(offset, length)
        self.stats.latency["read"].since(start)
        return data

    def read_slice(self, offset: int, length: int) -> bytes | FileSlice:
        """A read whose data the caller may send zero-copy (see :class:`FileSlice`)."""
        self.check_read_range(offset, length)
        self.stats.reads += 1
        self.stats.bytes_read += length
        start = perf_counter()
        data = self._backend.read_slice(offset, length)
        self.stats.latency["read"].since(start)
        return data

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """A read that never waits for a disk: the data, or ``None`` (read it on
        the worker).  Front ends may call it on their event loop."""
        if self.unavailable:
            return None
        self.check_read_range(offset, length)
        data = self._backend.read_cached(offset, length)
        if data is not None:
            self.stats.reads += 1
            self.stats.bytes_read += length
        return data

    def write(
        self, offset: int, data: bytes | bytearray | memoryview, *, fua: bool = False
    ) -> None:
        length = len(data)
        self._check_write(offset, length)
        # _done also after a failure (the file may have changed partly) and after
        # a listener refused the change (listeners before it saw it start).
        try:
            self._accept_change(offset, length)
            stats = self.stats
            stats.writes += 1
            stats.bytes_written += length
            start = perf_counter()
            self._backend.write(offset, data)
        finally:
            self._done()
        self.stats.latency["write"].since(start)
        if fua:
            self._backend.flush()

    def trim(self, offset: int, length: int, *, fua: bool = False) -> None:
        self._check_write(offset, length)
        try:
            self._accept_change(offset, length)
            self.stats.trims += 1
            self._backend.trim(offset, length)
        finally:
            self._done()
        if fua:
            self._backend.flush()

    def zero(
        self,
        offset: int,
        length: int,
        *,
        may_trim: bool = True,
        fast_only: bool = False,
        fua: bool = False,
    ) -> None:
        self._check_write(offset, length)
        # A fast zero the backend then refuses has still been accepted as a change:
        # reporting "changed" for data that did not change is the safe direction.
        try:
            self._accept_change(offset, length)
            self.stats.zeroes += 1
            self._backend.zero(offset, length, may_trim=may_trim, fast_only=fast_only)
        finally:
            self._done()
        if fua:
            self._backend.flush()

    # -- writes the array itself makes (mirror copies, restores) ---------------------
    # They skip the host checks (read-only flag, guards) but not the change gate:
    # every copy the array makes changes the receiving LUN's state (C1).

    def array_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check_range(offset, len(data))
        try:
            self._accept_change(offset, len(data))
            self._backend.write(offset, data)
        finally:
            self._done()

    def array_zero(self, offset: int, length: int) -> None:
        self._check_range(offset, length)
        try:
            self._accept_change(offset, length)
            self._backend.zero(offset, length, may_trim=True, fast_only=False)
        finally:
            self._done()

    def flush(self) -> None:
        self.stats.flushes += 1
        start = perf_counter()
        self._backend.flush()
        self.stats.latency["flush"].since(start)

    def cache(self, offset: int, length: int) -> None:
        self.check_read_range(offset, length)
        self._backend.cache(offset, length)

    def extents(self, offset: int, length: int) -> list[Extent]:
        self.check_read_range(offset, length)
        return self._backend.extents(offset, length)

    # -- management -------------------------------------------------------------

    def grow(self, new_size: int) -> None:
        """Grow the LUN (data-changing: the new tail appears as zeroes)."""
        validate_size(new_size)
        if new_size <= self.record.size:
            raise InvalidArgument(
                f"new size {new_size} must be larger than the current size {self.record.size}"
                " (LUNs can only grow)"
            )
        old = self.record.size
        try:
            self._accept_change(old, new_size - old)
            self._backend.resize(new_size)
        finally:
            self._done()
        self.record = self.record.with_changes(size=new_size)

    def peers(self) -> list[str]:
        """Who has the LUN open (NBD connections' peers), for "in use by" messages."""
        return sorted(str(getattr(user, "peer", "?")) for user in self.users)

    def revoke_users(self, reason: str) -> None:
        for user in list(self.users):
            user.revoke(reason)
        self.users.clear()


class UnavailableBackend(Backend):
    """Stands in for the backing file of an unavailable LUN: every call is refused.

    Front ends refuse such a LUN before touching data; this is the safety net
    that keeps anything that slips past from reading or writing nothing silently.
    """

    kind = "file"

    def __init__(self, lun_name: str, size: int, reason: str) -> None:
        self._size = size
        self._error = f"LUN {lun_name} is unavailable: {reason}"

    @property
    def size(self) -> int:
        return self._size

    def _refuse(self) -> LunUnavailable:
        return LunUnavailable(self._error)

    def read(self, offset: int, length: int) -> bytes:
        raise self._refuse()

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        raise self._refuse()

    def flush(self) -> None:
        raise self._refuse()

    def trim(self, offset: int, length: int) -> None:
        raise self._refuse()

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        raise self._refuse()

    def extents(self, offset: int, length: int) -> list[Extent]:
        raise self._refuse()

    def resize(self, size: int) -> None:
        raise self._refuse()

    def close(self) -> None:
        pass


async def run_on_lun(lun: Lun, fn: Callable[[], T]) -> T:
    """Run ``fn`` on the LUN's worker, in order with its I/O, without blocking the
    event loop (front ends and the daemon's loops use this).  A LUN without a
    worker runs it inline."""
    if lun.worker is None:
        return fn()
    return await asyncio.wrap_future(lun.worker.submit(fn))
