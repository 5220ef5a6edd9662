"""Mirrors: synchronous fan-out, split, tracked resync and reverse restore.

::

  create -> syncing --copy done--> synced --split--> split --resync--> resyncing --> synced
                                      |                |  ^
                           leg fails  v       restore  v  |  (copy target -> source, split again)
                                  degraded          restoring
                                      '--resync--> resyncing

Region maps (one byte per 64 KiB region), one per side: ``source`` holds the
regions written on the source since the split (or missed by a failing target,
or not copied yet), ``target`` those hosts wrote on a split target.  Resync
copies their union source -> target, restore target -> source; neither copies
anything else.  While a copy runs, the union is kept in ``source``.

Crash safety (a write-intent log, as RAID bitmaps do): before a write lands
in a 16 MiB intent region not yet logged in this busy period, the region is
logged durably.  One commit covers every new region of a write, or of a whole
batch of writes (:meth:`Mirror.log_intents`, called before the batch's first
write), never one commit per region.  At a checkpoint (both sides flushed) the exact maps are
saved and the intent log cleared.  Recovery takes the saved map plus every
logged intent region, so a crash never loses a mark; a synced mirror with
marks after a crash resynchronises them.

The copy runs in bounded steps (:meth:`Mirror.copy_step`) driven by the
daemon on the source LUN's worker, the thread that also runs the source's host
writes: each chunk is read and written within one job, so a host write can
never slip between a chunk's read and its write, and host I/O interleaves
between steps.  Checkpoints run there too.

Status is O(1): each map counts its marked regions, and ``union`` (the regions
marked on either side, what a resync or restore copies) is kept up to date by
the same marks and clears, so no status call scans or copies a map.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Protocol

from lunseal.engine.lun import Lun
from lunseal.engine.state.changemap import ChangedExtent, ChangeMap
from lunseal.errors import BackendError, Conflict

log = logging.getLogger(__name__)


class MirrorState(StrEnum):
    SYNCING = "syncing"
    SYNCED = "synced"
    SPLIT = "split"
    RESYNCING = "resyncing"
    RESTORING = "restoring"
    DEGRADED = "degraded"


class TargetAccess(StrEnum):
    """What hosts may do with a split target."""

    RO = "ro"
    RW = "rw"


# Short names for the states, used throughout the mirror code.
SYNCING, SYNCED, SPLIT = MirrorState.SYNCING, MirrorState.SYNCED, MirrorState.SPLIT
RESYNCING, RESTORING = MirrorState.RESYNCING, MirrorState.RESTORING
DEGRADED = MirrorState.DEGRADED
COPYING = (SYNCING, RESYNCING, RESTORING)
#: States in which host writes to the source are also written to the target.
FAN_OUT = (SYNCING, SYNCED, RESYNCING)
GRANULARITY = 64 << 10
INTENT_REGION = 16 << 20
COPY_CHUNK = 4 << 20
SOURCE, TARGET = "source", "target"


class MirrorLeg(ABC):
    """The receiving side of a mirror.  Local today; another array over NBD later."""

    name: str

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def zero(self, offset: int, length: int) -> None: ...

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes: ...

    @abstractmethod
    def is_hole(self, offset: int, length: int) -> bool: ...

    @abstractmethod
    def flush(self) -> None: ...


class LocalLeg(MirrorLeg):
    """A LUN of this array; writes go through its change gate (its token changes)."""

    def __init__(self, lun: Lun) -> None:
        self.lun = lun
        self.name = lun.name

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.lun.array_write(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.lun.array_zero(offset, length)

    def read(self, offset: int, length: int) -> bytes:
        return self.lun.backend.read(offset, length)

    def is_hole(self, offset: int, length: int) -> bool:
        return _all_zero(self.lun, offset, length)

    def flush(self) -> None:
        self.lun.flush()


def _union_of(maps: dict[str, ChangeMap]) -> ChangeMap:
    """Built once (creation, start-up); marks and clears keep it current after."""
    source = maps[SOURCE]
    union = ChangeMap(source.size, source.granularity, bytearray(source.regions))
    union.merge(maps[TARGET])
    return union


def _all_zero(lun: Lun, offset: int, length: int) -> bool:
    return all(ext.zero for ext in lun.backend.extents(offset, length))


@dataclass(frozen=True)
class MirrorRecord:
    id: str
    name: str
    source_uuid: str
    target_uuid: str
    state: MirrorState
    created_at: float
    split_at: float | None = None
    target_access: TargetAccess = TargetAccess.RO
    #: Bytes the running copy operation had to copy when it started (progress).
    op_total: int = 0
    reason: str = ""

    def with_changes(self, **changes: object) -> MirrorRecord:
        return replace(self, **changes)  # type: ignore[arg-type]


class MirrorStore(Protocol):
    def save_mirror(self, rec: MirrorRecord, maps: dict[str, ChangeMap] | None = None) -> None: ...

    def save_maps(
        self, mirror_id: str, maps: dict[str, ChangeMap], clear_intents: bool = False
    ) -> None: ...

    def log_intents(self, mirror_id: str, side: str, regions: list[int]) -> None: ...


class Mirror:
    def __init__(
        self,
        record: MirrorRecord,
        source: Lun,
        target: Lun,
        leg: MirrorLeg,
        store: MirrorStore,
        maps: dict[str, ChangeMap],
        intents: Iterable[tuple[str, int]] = (),
    ) -> None:
        self.record = record
        self.source = source
        self.target = target
        self.leg = leg
        self.store = store
        self.maps = maps
        self.union = _union_of(maps)
        #: The maps are marked on the source's worker and, for host writes to a
        #: split target, on the target's: one lock keeps marks, merges and clears whole.
        self._lock = threading.RLock()
        #: Set on the thread that is writing the target for this mirror, so the
        #: target's gate can tell the mirror's own writes from a host's.
        self._own = threading.local()
        self._intents = set(intents)
        self.copied = 0  # bytes copied by the running operation in this process
        self._last_mark = 0.0
        #: Called when a copy starts, so whoever drives copy_step wakes up at once.
        self.on_copy_start: Callable[[], None] = lambda: None
        self._last_checkpoint = time.monotonic()
        target.listeners.append(self._on_target_change)
        self._apply_guards()

    @property
    def name(self) -> str:
        return self.record.name

    @property
    def state(self) -> MirrorState:
        return self.record.state

    # -- the host write path (called by MirroredBackend and the target's gate) ----------

    def before_source_change(self, offset: int, length: int) -> None:
        if self.state != RESTORING:
            self._mark(SOURCE, offset, length)

    def log_source_intents(self, ranges: Iterable[tuple[int, int]]) -> None:
        """Before a batch of source writes (see :meth:`log_intents`)."""
        if self.state != RESTORING:
            self.log_intents(SOURCE, ranges)

    def replicate_write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if self.state in FAN_OUT:
            self._to_leg(lambda: self.leg.write(offset, data))

    def replicate_zero(self, offset: int, length: int) -> None:
        if self.state in FAN_OUT:
            self._to_leg(lambda: self.leg.zero(offset, length))

    def replicate_flush(self) -> None:
        if self.state in FAN_OUT:
            self._to_leg(self.leg.flush)

    def _to_leg(self, op: Callable[[], None]) -> None:
        try:
            self._as_mirror(op)
        except BackendError as exc:
            # The host's write succeeded on the source; the region is marked
            # (before the write), so a later resync repairs the target.
            self.degrade(f"target {self.leg.name} failed: {exc.message}")

    def _as_mirror(self, op: Callable[[], None]) -> None:
        self._own.writing = True
        try:
            op()
        finally:
            self._own.writing = False

    def _on_target_change(self, lun: Lun, offset: int, length: int) -> None:
        if getattr(self._own, "writing", False):
            return  # this mirror's own write (fan-out or copy)
        with self._lock:
            if self.state == SPLIT:
                self._mark(TARGET, offset, length)
            elif self.state in COPYING:
                # A host write to a split rw target that passed the target's guard
                # just before a resync or restore started (the target's worker runs
                # it): the copy must cover it, so it goes to the copy's own map.
                self._mark(SOURCE, offset, length)

    def log_intents(self, side: str, ranges: Iterable[tuple[int, int]]) -> int:
        """Log every intent region of ``ranges`` not yet logged, in one durable
        commit; returns how many were new.  Call it before a batch of writes so
        the batch pays one commit; each write's own mark then finds its regions
        logged already."""
        with self._lock:
            new: set[int] = set()
            for offset, length in ranges:
                if length <= 0:
                    continue
                first, last = offset // INTENT_REGION, (offset + length - 1) // INTENT_REGION
                new.update(r for r in range(first, last + 1) if (side, r) not in self._intents)
            if new:
                regions = sorted(new)
                self.store.log_intents(self.record.id, side, regions)  # durable before writes
                self._intents.update((side, r) for r in regions)
            return len(new)

    def _mark(self, side: str, offset: int, length: int) -> None:
        if length <= 0:
            return
        with self._lock:
            self.log_intents(side, ((offset, length),))
            self.maps[side].mark(offset, length)
            self.union.mark(offset, length)
            self._last_mark = time.monotonic()

    @property
    def work(self) -> ChangeMap:
        return self.maps[SOURCE]

    # -- state changes ------------------------------------------------------------------

    def _set(self, **changes: object) -> None:
        self.record = self.record.with_changes(**changes)
        self.store.save_mirror(self.record)
        self._apply_guards()

    def _apply_guards(self) -> None:
        key = f"mirror:{self.record.id}"
        self.source.write_guards.pop(key, None)
        self.target.write_guards.pop(key, None)
        if self.state == RESTORING:
            self.source.write_guards[key] = (
                f"mirror {self.name} is restoring it from {self.target.name}"
            )
        if not (self.state == SPLIT and self.record.target_access == "rw"):
            self.target.write_guards[key] = f"it is the target of mirror {self.name} ({self.state})"

    def degrade(self, reason: str) -> None:
        if self.state != DEGRADED:
            log.error("mirror %s degraded: %s", self.name, reason)
            self._set(state=DEGRADED, reason=reason)

    def split(self, target_access: str = "ro") -> None:
        if self.state != SYNCED:
            raise Conflict(f"mirror {self.name} is {self.state}; only a synced mirror can split")
        if target_access not in tuple(TargetAccess):
            raise Conflict(f"target access must be ro or rw, not {target_access!r}")
        # One flush per side: the checkpoint's (the maps are clear once synced).
        self.checkpoint()
        access = TargetAccess(target_access)
        self._set(state=SPLIT, split_at=time.time(), target_access=access, reason="")
        log.info("mirror %s split (target %s)", self.name, target_access)

    def resync(self) -> None:
        if self.state not in (SPLIT, DEGRADED):
            raise Conflict(f"mirror {self.name} is {self.state}; resync needs split or degraded")
        self._start(RESYNCING)

    def restore(self) -> None:
        if self.state != SPLIT:
            raise Conflict(f"mirror {self.name} is {self.state}; restore needs a split mirror")
        self._start(RESTORING)

    def begin_sync(self) -> None:
        """The initial full copy (the caller marked every region)."""
        self._start(SYNCING)

    def _start(self, state: MirrorState) -> None:
        with self._lock:  # no host mark on the target may fall between these
            self.maps[SOURCE].merge(self.maps[TARGET])
            self.maps[TARGET].clear(0, self.maps[TARGET].size)
            self.copied = 0
            self._set(state=state, op_total=self.dirty_bytes(), reason="")
        self.on_copy_start()
        self.checkpoint()  # in the copying state now, so the maps are kept
        log.info("mirror %s: %s %d bytes", self.name, state, self.record.op_total)

    # -- copying ---------------------------------------------------------------------------

    def copy_step(self, budget: int = COPY_CHUNK) -> int:
        """Copy up to ``budget`` bytes of marked regions; finish when none are left."""
        if self.state not in COPYING:
            return 0
        done = 0
        while done < budget:
            run = self._next_run(budget - done)
            if run is None:
                self._finish()
                break
            offset, length = run
            try:
                self._copy(offset, length)
            except BackendError as exc:
                if self.state == RESTORING:
                    # The target still holds the backup: stay split (the regions not
                    # restored stay marked) so the restore can be retried.  Degraded
                    # would leave only resync, which overwrites the backup.
                    reason = f"restore failed: copy {offset}+{length}: {exc.message}"
                    log.error("mirror %s: %s", self.name, reason)
                    self._set(state=SPLIT, op_total=0, reason=reason)
                else:
                    self.degrade(f"copy {offset}+{length} failed: {exc.message}")
                break
            with self._lock:
                self.work.clear(offset, length)
                self.union.clear(offset, length)  # while copying, the target's map is empty
            done += length
            # Counted before the next run can finish the copy: a status read on
            # another thread that sees the final state sees every byte copied.
            self.copied += length
        return done

    def _next_run(self, limit: int) -> tuple[int, int] | None:
        return self.work.first_run(limit)

    def _copy(self, offset: int, length: int) -> None:
        if self.state == RESTORING:
            if self.leg.is_hole(offset, length):
                self.source.array_zero(offset, length)
            else:
                self.source.array_write(offset, self.leg.read(offset, length))
        elif _all_zero(self.source, offset, length):
            self._as_mirror(lambda: self.leg.zero(offset, length))
        else:
            data = self.source.backend.read(offset, length)
            self._as_mirror(lambda: self.leg.write(offset, data))

    def _finish(self) -> None:
        # Flush both sides once, then record the new state and the maps: nothing
        # writes between (this job runs on the source's worker), so the one
        # flush covers the checkpoint too.
        self._flush_sides()
        finished = self.state
        self._set(state=SPLIT if finished == RESTORING else SYNCED, op_total=0)
        self._save_checkpoint()
        log.info("mirror %s: %s finished, now %s", self.name, finished, self.state)

    # -- durability -------------------------------------------------------------------------

    def checkpoint_if_due(self, idle: float, every: float = 1.0) -> None:
        """Checkpoint once writes have been idle, and regularly while copying."""
        now = time.monotonic()
        if self.state in COPYING:
            due = now - self._last_checkpoint >= every
        else:
            due = bool(self._intents) and now - self._last_mark >= idle
        if due:
            try:
                self.checkpoint()
            except BackendError as exc:
                self.degrade(f"flush failed: {exc.message}")

    def checkpoint(self) -> None:
        """Flush both sides, save the exact maps, clear the intent log."""
        self._flush_sides()
        self._save_checkpoint()

    def _flush_sides(self) -> None:
        self._last_checkpoint = time.monotonic()
        # The source's own data only: flushing its MirroredBackend would flush
        # every target of the source too, and this leg a second time.
        self.source.backend.flush_own()
        if self.state != DEGRADED:
            self.leg.flush()

    def _save_checkpoint(self) -> None:
        """The second half of :meth:`checkpoint`, once both sides are flushed."""
        with self._lock:
            if self.state == SYNCED:
                for m in (*self.maps.values(), self.union):
                    m.clear(0, m.size)  # both sides hold the same bytes
            self.store.save_maps(self.record.id, self.maps, bool(self._intents))
            self._intents.clear()

    def recover(self) -> None:
        """At start-up, after the intent log was merged into ``work``."""
        if self.state == SYNCED and self.work.changed_regions():
            log.warning(
                "mirror %s: writes may have been in flight at a crash; resyncing", self.name
            )
            self._start(RESYNCING)
        elif self.state in COPYING:
            log.info("mirror %s: resuming %s", self.name, self.state)
            # A crash between saving the copying state and saving the merged maps
            # (see _start) leaves the target's marks apart: copy the union.
            self.maps[SOURCE].merge(self.maps[TARGET])
            self.maps[TARGET].clear(0, self.maps[TARGET].size)
            self.copied = 0

    # -- status ------------------------------------------------------------------------------

    def dirty_bytes(self) -> int:
        """Bytes in regions that differ or may differ (union of both sides): O(1)."""
        return self.union.changed_bytes()

    def dirty_regions(self) -> int:
        return self.union.changed_regions()

    def copy_extents(self) -> list[ChangedExtent]:
        """The regions that differ or may differ: what a resync or restore copies."""
        return self.union.extents()

    def progress(self) -> float:
        """Percent done of the running copy (100 when idle)."""
        total = self.record.op_total
        if self.state not in COPYING or total <= 0:
            return 100.0
        return max(0.0, min(100.0, 100.0 * (1 - self.dirty_bytes() / total)))

    def detach(self) -> None:
        key = f"mirror:{self.record.id}"
        self.source.write_guards.pop(key, None)
        self.target.write_guards.pop(key, None)
        if self._on_target_change in self.target.listeners:
            self.target.listeners.remove(self._on_target_change)
