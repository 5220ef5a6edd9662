"""The mirrors of an array: create, find, delete, and drive their copies."""

from __future__ import annotations

import functools
import logging
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import TypeVar

from lunseal.engine.backends.layers import MirroredBackend
from lunseal.engine.lun import Lun, validate_name
from lunseal.engine.mirror.mirror import (
    COPY_CHUNK,
    COPYING,
    GRANULARITY,
    SOURCE,
    SPLIT,
    SYNCING,
    TARGET,
    LocalLeg,
    Mirror,
    MirrorRecord,
)
from lunseal.engine.mirror.store import SqliteMirrorStore
from lunseal.engine.state.changemap import ChangeMap
from lunseal.errors import Conflict, InvalidArgument, NotFound

log = logging.getLogger(__name__)

#: Looks a LUN up by UUID (the catalog links mirrors to LUNs by UUID).
LunByUuid = Callable[[str], Lun | None]
T = TypeVar("T")


def _refuse_if_holds_data(target: Lun) -> None:
    # Allocated extents count as data: cheap to ask, and "maybe data" must not be overwritten.
    data = next((e for e in target.backend.extents(0, target.size) if not e.zero), None)
    if data is not None:
        raise Conflict(
            f"target LUN {target.name} is not empty (data at byte {data.offset}): the mirror "
            "would overwrite it; use force to do it anyway"
        )


class MirrorSet:
    def __init__(self, store: SqliteMirrorStore, lun_by_uuid: LunByUuid) -> None:
        self.store = store
        self._lun_by_uuid = lun_by_uuid
        self._mirrors: dict[str, Mirror] = {}
        #: Set by the daemon: wakes its copy loop when a copy starts.
        self.wake: Callable[[], None] = lambda: None

    def load(self) -> None:
        for rec in self.store.mirrors():
            source, target = self._lun_by_uuid(rec.source_uuid), self._lun_by_uuid(rec.target_uuid)
            if source is None or target is None:
                log.error("mirror %s refers to a missing LUN; dropping it", rec.name)
                self.store.delete_mirror(rec.id)
                continue
            maps, intents = self.store.load_maps(rec.id, source.size)
            self._attach(rec, source, target, maps, intents).recover()

    def _attach(
        self,
        rec: MirrorRecord,
        source: Lun,
        target: Lun,
        maps: dict[str, ChangeMap],
        intents: set[tuple[str, int]],
    ) -> Mirror:
        fan_out = source.top_layer(MirroredBackend) or source.push_layer(MirroredBackend)
        mirror = Mirror(rec, source, target, LocalLeg(target), self.store, maps, intents)
        mirror.on_copy_start = lambda: self.wake()
        fan_out.mirrors.append(mirror)
        self._mirrors[rec.name] = mirror
        return mirror

    # -- lookup ---------------------------------------------------------------------

    def all(self) -> list[Mirror]:
        return sorted(self._mirrors.values(), key=lambda m: m.record.created_at)

    def get(self, name: str) -> Mirror:
        """By mirror name, by its id (what ``mirror status --json`` prints), or by
        the name of its target LUN."""
        found = self._mirrors.get(name) or next(
            (m for m in self._mirrors.values() if name in (m.record.id, m.target.name)), None
        )
        if found is None:
            raise NotFound(f"no mirror named {name!r} (nor one with that id or target LUN)")
        return found

    def of_lun(self, lun: Lun) -> list[Mirror]:
        return [m for m in self._mirrors.values() if lun in (m.source, m.target)]

    # -- management ---------------------------------------------------------------------

    def create(
        self, source: Lun, target: Lun, name: str | None = None, *, require_empty: bool = False
    ) -> Mirror:
        """Pair ``source`` with ``target``; with ``require_empty``, refuse a target
        that holds data (the initial sync overwrites all of it)."""
        name = validate_name(name or target.name)
        self._check_pair(source, target, name)
        if require_empty:
            _refuse_if_holds_data(target)
        rec = MirrorRecord(
            id=str(uuidlib.uuid4()),
            name=name,
            source_uuid=source.record.uuid,
            target_uuid=target.record.uuid,
            state=SYNCING,
            created_at=time.time(),
        )
        maps = {side: ChangeMap(source.size, GRANULARITY) for side in (SOURCE, TARGET)}
        maps[SOURCE].mark_all()  # the initial sync copies everything
        # One transaction: a mirror record found without its maps would sync nothing.
        self.store.save_mirror(rec, maps)
        mirror = self._attach(rec, source, target, maps, set())
        mirror.begin_sync()
        log.info("mirror %s created: %s -> %s", name, source.name, target.name)
        return mirror

    def _check_pair(self, source: Lun, target: Lun, name: str) -> None:
        if source is target:
            raise InvalidArgument("a LUN cannot mirror itself")
        if source.size != target.size:
            raise InvalidArgument(
                f"target {target.name} is {target.size} bytes, source {source.name} is "
                f"{source.size}: they must be the same size"
            )
        if name in self._mirrors:
            raise Conflict(f"a mirror named {name!r} already exists")
        for m in self._mirrors.values():
            if target in (m.source, m.target):
                raise Conflict(f"LUN {target.name} already belongs to mirror {m.name}")
            if source is m.target:
                raise Conflict(f"LUN {source.name} is the target of mirror {m.name}")
        if target.record.read_only:
            raise Conflict(f"target LUN {target.name} is read-only")

    def delete(self, name: str) -> None:
        mirror = self.get(name)
        mirror.detach()
        fan_out = mirror.source.top_layer(MirroredBackend)
        if fan_out is not None:
            fan_out.mirrors.remove(mirror)
            if not fan_out.mirrors:
                mirror.source.pop_layer(fan_out)
        self.store.delete_mirror(mirror.record.id)
        del self._mirrors[mirror.name]
        log.info(
            "mirror %s deleted; LUNs %s and %s kept", name, mirror.source.name, mirror.target.name
        )

    # -- background work -------------------------------------------------------------------

    def busy(self) -> bool:
        return any(m.state in COPYING for m in self._mirrors.values())

    def writer_of(self, lun: Lun) -> Lun:
        """The LUN on whose worker ``lun`` is written, so its checkpoints run there
        too (a checkpoint racing a write could record a changed LUN as clean):
        a mirror target is written by its source's worker (fan-out, copies)
        except while split, when only hosts write it."""
        for m in self._mirrors.values():
            if m.target is lun and m.state != SPLIT:
                return m.source
        return lun

    def copying(self) -> list[Mirror]:
        return [m for m in self.all() if m.state in COPYING]

    def copy_step(self, budget: int = COPY_CHUNK) -> int:
        """One step of every running copy, each on its source's worker (in order
        with the host writes that fan out to the same regions); the daemon's
        loop submits ``Mirror.copy_step`` itself so it never waits."""
        return sum(m.source.run(functools.partial(m.copy_step, budget)) for m in self.copying())

    def checkpoint(self, idle: float, source: Lun | None = None) -> None:
        """Checkpoint the mirrors that are due (only those of ``source`` if given)."""
        for m in list(self._mirrors.values()):
            if source is None or m.source is source:
                m.source.run(functools.partial(m.checkpoint_if_due, idle))

    def close(self) -> None:
        for m in self._mirrors.values():
            m.checkpoint()
