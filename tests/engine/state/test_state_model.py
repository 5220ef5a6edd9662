"""Model-based test of the state-token contract: random operation sequences on a
real array (real files, real SQLite), with clean restarts and simulated crashes.

The model keeps, per LUN identity, two counters:

* ``must``: data-changing operations and tracking on/off transitions.  Two
  tokens of one LUN identity with different ``must`` must differ (C1, C4).
* ``may``: ``must`` plus crashes that found the LUN with unrecorded changes.
  Two tokens with the same ``may`` must be equal (C3): only a data change, an
  off/on gap or a crash of a dirty LUN can justify "changed".

Tokens of different identities (other LUN, or deleted and re-created under the
same name and number) must always differ (C6).  Every hold's change map must
equal the model's exactly: the regions touched since the hold was acquired,
or everything after a crash of a dirty LUN.  Restarts may come with a backing
file changed behind the array's back (a byte appended, or the file replaced by
a copy), which must change the state (C5).

Every backend sits on a :class:`PowerLossBackend`, and a power loss drops every
write no completed flush covers before the crash.  Data that goes back to an
older content is a change (``must``); and a LUN recorded clean must have had
nothing unflushed to lose, or the durability protocol is broken.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from lunseal.engine.array import Array
from lunseal.engine.backends.layers import PowerLossBackend
from lunseal.engine.state.tracker import MODES
from lunseal.errors import Conflict, NotFound
from tests.support.arrays import abandon

KiB = 1 << 10
MiB = 1 << 20

LUN_NAMES = ("a", "b")
HOLD_NAMES = ("h1", "h2", "h3")
INITIAL_SIZE = 512 * KiB
MAX_SIZE = 2 * MiB

_identities = itertools.count(1)


@dataclass(frozen=True)
class Seen:
    """A token as it was observed, with the model's view of that moment."""

    lun: str
    ident: int
    must: int
    may: int
    token: str


@dataclass
class ModelLun:
    ident: int
    size: int
    number: int
    mode: str | None = None
    holds: dict[str, int | None] = field(default_factory=dict)  # name -> map granularity
    maps: dict[str, set[int]] = field(default_factory=dict)  # name -> changed regions
    must: int = 0
    may: int = 0
    dirty: bool = False

    def changed(self, offset: int, length: int) -> None:
        self.must += 1
        self.may += 1
        self.dirty = True
        for name, regions in self.maps.items():
            g = self.holds[name]
            assert g is not None
            regions.update(range(offset // g, (offset + length - 1) // g + 1))

    def expected_extents(self, hold: str) -> list[tuple[int, int]]:
        g = self.holds[hold]
        assert g is not None
        found: list[tuple[int, int]] = []
        for region in sorted(self.maps[hold]):
            start = region * g
            end = min(start + g, self.size)
            if found and found[-1][0] + found[-1][1] == start:
                found[-1] = (found[-1][0], end - found[-1][0])
            else:
                found.append((start, end - start))
        return found


class StateModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="lunseal-model-"))
        self.array: Array | None = Array.open(self.dir)
        self.model: dict[str, ModelLun] = {}
        self.seen: list[Seen] = []
        for number, name in enumerate(LUN_NAMES):
            self.array.create_lun(name, INITIAL_SIZE, number=number)
            self.model[name] = ModelLun(next(_identities), INITIAL_SIZE, number)
        self.volatile()

    def volatile(self) -> None:
        """Put every LUN's backend on a volatile cache that a power loss empties."""
        for lun in self.arr.luns():
            if not isinstance(lun._backend, PowerLossBackend):
                lun._backend = PowerLossBackend(lun._backend)

    def teardown(self) -> None:
        if self.array is not None:
            self.array.close()
            self.array = None
        shutil.rmtree(self.dir, ignore_errors=True)

    # -- helpers ------------------------------------------------------------------------

    @property
    def arr(self) -> Array:
        assert self.array is not None
        return self.array

    def span(self, name: str, offset: int, length: int) -> tuple[int, int]:
        """Fit a drawn range into the LUN (at least one byte)."""
        size = self.model[name].size
        offset %= size
        length = 1 + (length - 1) % (size - offset)
        return offset, length

    def observe(self, name: str, token: str) -> None:
        m = self.model[name]
        now = Seen(name, m.ident, m.must, m.may, token)
        for old in self.seen:
            if old.ident != now.ident:
                assert old.token != token, f"C6: tokens of two LUN identities are equal: {old}"
            elif old.must != now.must:
                assert old.token != token, f"C1/C4/C5: token unchanged across a change: {old}"
            elif old.may == now.may:
                assert old.token == token, f"C3: token changed without cause: {old} -> {token}"
        self.seen.append(now)

    def look(self, look: bool) -> None:
        """Read the token of every tracked LUN (when the draw says so)."""
        if look:
            for name, m in self.model.items():
                if m.holds:
                    self.observe(name, self.arr.tracker(name).token())

    @initialize(modes=st.lists(st.sampled_from([None, *MODES]), min_size=2, max_size=2))
    def start_tracking(self, modes: list[str | None]) -> None:
        """Most examples start with tracking on, so that tokens can be read at once."""
        for name, mode in zip(LUN_NAMES, modes, strict=True):
            if mode is not None:
                self.acquire(name, "h1", mode, None)

    # -- data path ----------------------------------------------------------------------

    @rule(
        name=st.sampled_from(LUN_NAMES),
        op=st.sampled_from(["read", "flush", "cache", "extents"]),
        offset=st.integers(0, MAX_SIZE),
        length=st.integers(1, 256 * KiB),
        look=st.booleans(),
    )
    def non_changing(self, name: str, op: str, offset: int, length: int, look: bool) -> None:
        lun = self.arr.lun(name)
        offset, length = self.span(name, offset, length)
        if op == "read":
            assert len(lun.read(offset, length)) == length
        elif op == "flush":
            lun.flush()
        elif op == "cache":
            lun.cache(offset, length)
        else:
            lun.extents(offset, length)
        self.look(look)

    @rule(
        name=st.sampled_from(LUN_NAMES),
        op=st.sampled_from(["write", "trim", "zero", "zero-may-trim"]),
        offset=st.integers(0, MAX_SIZE),
        length=st.integers(1, 256 * KiB),
        fua=st.booleans(),
        look=st.booleans(),
    )
    def change(self, name: str, op: str, offset: int, length: int, fua: bool, look: bool) -> None:
        lun = self.arr.lun(name)
        offset, length = self.span(name, offset, length)
        if op == "write":
            lun.write(offset, bytes([length % 251 + 1]) * length, fua=fua)
        elif op == "trim":
            lun.trim(offset, length, fua=fua)
        else:
            lun.zero(offset, length, may_trim=op == "zero-may-trim", fua=fua)
        self.model[name].changed(offset, length)
        self.look(look)

    @rule(name=st.sampled_from(LUN_NAMES), sectors=st.integers(1, 1024), look=st.booleans())
    def grow(self, name: str, sectors: int, look: bool) -> None:
        m = self.model[name]
        new = min(MAX_SIZE, m.size + sectors * 512)
        if new == m.size:
            return
        self.arr.grow_lun(name, new)
        m.changed(m.size, new - m.size)
        m.size = new
        self.look(look)

    # -- holds and tokens -------------------------------------------------------------------

    @rule(
        name=st.sampled_from(LUN_NAMES),
        hold=st.sampled_from(HOLD_NAMES),
        mode=st.sampled_from([None, *MODES]),
        granularity=st.sampled_from([None, 4 * KiB, 64 * KiB]),
    )
    def acquire(self, name: str, hold: str, mode: str | None, granularity: int | None) -> None:
        m = self.model[name]
        tracker = self.arr.tracker(name)
        if hold in m.holds:
            with pytest.raises(Conflict):
                tracker.acquire(hold, mode=mode, granularity=granularity)
            return
        if m.holds and mode is not None and mode != m.mode:
            with pytest.raises(Conflict):
                tracker.acquire(hold, mode=mode, granularity=granularity)
            return
        got, token = tracker.acquire(hold, mode=mode, granularity=granularity)
        assert got.token == token
        if not m.holds:
            m.mode = mode or "counter"
            m.must += 1
            m.may += 1
        m.holds[hold] = granularity
        if granularity is not None:
            m.maps[hold] = set()
        self.observe(name, token)

    @rule(name=st.sampled_from(LUN_NAMES), hold=st.sampled_from(HOLD_NAMES))
    def release(self, name: str, hold: str) -> None:
        m = self.model[name]
        tracker = self.arr.tracker(name)
        if hold not in m.holds:
            with pytest.raises(NotFound):
                tracker.release(hold)
            return
        tracker.release(hold)
        del m.holds[hold]
        m.maps.pop(hold, None)
        if not m.holds:
            m.mode = None
            m.must += 1
            m.may += 1

    @rule(name=st.sampled_from(LUN_NAMES))
    def read_token(self, name: str) -> None:
        tracker = self.arr.tracker(name)
        if not self.model[name].holds:
            with pytest.raises(Conflict):
                tracker.token()
            return
        self.observe(name, tracker.token())

    @rule()
    def check_every_token_seen(self) -> None:
        for old in self.seen:
            m = self.model[old.lun]
            result = self.arr.tracker(old.lun).check(old.token)
            if old.ident != m.ident or old.must != m.must or not m.holds:
                assert not result.intact, f"false intact: {old} now {result}"
            elif old.may == m.may:
                assert result.intact, f"false changed: {old} now {result}"
            if old.ident == m.ident and m.holds:
                assert result.current == self.arr.tracker(old.lun).token()
            elif not m.holds:
                assert result.current is None

    # -- life cycle ---------------------------------------------------------------------------

    @rule(look=st.booleans())
    def checkpoint(self, look: bool) -> None:
        """Idle and recorded clean: from here a crash must keep every token."""
        self.arr.checkpoint(0)
        for m in self.model.values():
            m.dirty = False
        self.look(look)

    def restart(
        self,
        *,
        crash: bool,
        tamper: str | None,
        victim: str,
        look: bool,
        power_loss: bool = False,
    ) -> None:
        path = Path(self.arr.lun(victim).record.path)
        if power_loss:
            for name, m in self.model.items():
                layer = self.arr.lun(name)._backend
                assert isinstance(layer, PowerLossBackend)
                dropped = layer.power_loss()
                # Recorded clean means flushed: nothing may be lost from a clean LUN.
                assert not dropped or m.dirty, f"LUN {name} was clean with unflushed writes"
                if dropped:
                    m.must += 1  # the data went back: tokens issued since must not match
        if crash:
            abandon(self.arr)
        else:
            self.arr.close()
        self.array = None
        if tamper == "append":
            with path.open("ab") as f:
                f.write(b"!")
        elif tamper == "replace":
            copy = path.with_suffix(".copy")
            shutil.copy2(path, copy)
            os.replace(copy, path)
        self.array = Array.open(self.dir)
        self.volatile()
        for name, m in self.model.items():
            tampered = tamper is not None and name == victim
            if tampered:
                m.must += 1  # C5: the state must change
            if tampered or (crash and m.dirty):
                m.may += 1
                for hold, regions in m.maps.items():
                    g = m.holds[hold]
                    assert g is not None
                    regions.update(range(-(-m.size // g)))
            m.dirty = False
        self.look(look)

    @rule(
        look=st.booleans(),
        tamper=st.sampled_from([None, None, None, "append", "replace"]),
        victim=st.sampled_from(LUN_NAMES),
    )
    def clean_restart(self, look: bool, tamper: str | None, victim: str) -> None:
        """Close and open; with ``tamper``, someone changes a backing file meanwhile."""
        self.restart(crash=False, tamper=tamper, victim=victim, look=look)

    @rule(
        look=st.booleans(),
        tamper=st.sampled_from([None, None, None, "append", "replace"]),
        victim=st.sampled_from(LUN_NAMES),
    )
    def crash(self, look: bool, tamper: str | None, victim: str) -> None:
        """kill -9 (see :func:`abandon`) and open."""
        self.restart(crash=True, tamper=tamper, victim=victim, look=look)

    @rule(look=st.booleans(), victim=st.sampled_from(LUN_NAMES))
    def power_loss(self, look: bool, victim: str) -> None:
        """The power fails: unflushed writes are lost, then the array starts again."""
        self.restart(crash=True, tamper=None, victim=victim, look=look, power_loss=True)

    @rule(name=st.sampled_from(LUN_NAMES))
    def delete_and_recreate(self, name: str) -> None:
        """Same name, same number, same size: a new LUN all the same."""
        m = self.model[name]
        self.arr.delete_lun(name)
        self.arr.create_lun(name, INITIAL_SIZE, number=m.number)
        self.model[name] = ModelLun(next(_identities), INITIAL_SIZE, m.number)
        self.volatile()

    # -- invariants -----------------------------------------------------------------------------

    @invariant()
    def holds_and_maps_match_the_model(self) -> None:
        if self.array is None:
            return
        for name, m in self.model.items():
            tracker = self.arr.tracker(name)
            assert set(tracker.holds) == set(m.holds)
            assert tracker.tracking is bool(m.holds)
            assert self.arr.lun(name).size == m.size
            if m.holds:
                assert tracker.state.mode == m.mode
            for hold, granularity in m.holds.items():
                changes = tracker.hold(hold).changes
                if granularity is None:
                    assert changes is None
                    continue
                assert changes is not None
                assert changes.granularity == granularity
                got = [(e.offset, e.length) for e in changes.extents()]
                assert got == m.expected_extents(hold), hold


StateModel.TestCase.settings = settings(
    max_examples=200,
    stateful_step_count=50,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestStateModel = StateModel.TestCase
