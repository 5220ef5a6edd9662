"""LUN state tracking: holds, tokens and crash-safe state (docs/design.md section 3).

A LUN's state is ``(epoch, mode, value)``; a token is that state plus the LUN's
UUID, as an opaque string.  The rules that make the contract hold:

* ``value`` only ever grows.  While tracking is on, every accepted change
  advances it (counter: +1; timestamp: the change's time, forced strictly
  increasing; flag: sets a dirty flag, and the next token issued bumps the
  value and clears the flag).  Turning tracking on or off advances it too (C4).
* Changes are seen through the LUN's change gate, before the backend is
  touched (C2).
* Crash safety without a cost per write: before the first change after a quiet
  period the LUN is durably marked *dirty* and gets a fresh random epoch; once
  writes have been idle for a while, the backend is flushed and the exact
  state, the change maps and the backing file's stamp are recorded with the
  LUN marked *clean*.  At start-up a LUN found dirty, or whose backing file's
  stamp differs (C5), gets a new random epoch, so no earlier token can match
  (C1) while an idle LUN keeps its tokens (C3).  Because epochs are random and
  every busy period starts a new one, two histories that share a past (a data
  directory rolled back or cloned) never share a token once either writes.
* The backing file's stamp after the array's own last change is known (see
  :class:`StampWatch`); a different stamp at a token
  issue, a check or a checkpoint means another process wrote the file: new
  epoch.  Change maps are then marked entirely changed: they must cover every
  region that may have been written, and the exact set is unknown.
* The in-memory state only changes after the catalog has saved it, so a
  failing catalog (a full disk) fails the operation rather than acknowledging
  a change the catalog does not know about.
"""

from __future__ import annotations

import functools
import logging
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from enum import StrEnum
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from lunseal.engine.backends.base import FileStamp
from lunseal.engine.lun import Lun
from lunseal.engine.state.changemap import ChangeMap
from lunseal.errors import Conflict, InvalidArgument, NotFound

log = logging.getLogger(__name__)


class TrackingMode(StrEnum):
    """How a LUN's state value moves; the value is what tokens and the catalog carry."""

    COUNTER = "counter"  # +1 per accepted data-changing request
    TIMESTAMP = "timestamp"  # nanoseconds of the last change, strictly increasing
    FLAG = "flag"  # +1 per token issued after a change


MODES = tuple(TrackingMode)
DEFAULT_MODE = TrackingMode.COUNTER
DEFAULT_HOLD = "default"
TOKEN_PREFIX = "lst1"
HOLD_NAME_MAX = 128
#: Epochs issued by this version: 64 random bits as 16 hex digits.  Catalogs of
#: schema 1 counted epochs (1, 2, ...); those survive as decimal text of at most
#: 15 digits, so an old epoch can never equal a new one.
_EPOCH_RE = re.compile(r"[0-9a-f]{16}|[1-9][0-9]{0,14}")
#: How many earlier epochs ``check`` can still explain.
EPOCH_HISTORY = 32

WRITTEN = "data was written since the token was issued"
RECOVERED = "recovered after an unclean shutdown: changes may not have been recorded"
FOREIGN = "the backing file was changed by another process while the array was running"


def new_epoch() -> str:
    return secrets.token_hex(8)


@dataclass
class LunState:
    """The persisted part of a LUN's state."""

    lun_uuid: str
    mode: TrackingMode = DEFAULT_MODE
    epoch: str = field(default_factory=new_epoch)
    value: int = 0
    flag: bool = False
    clean: bool = True
    stamp: FileStamp | None = None
    #: Why the epoch last changed, for ``check`` to explain itself.
    epoch_reason: str = ""
    #: Earlier epochs, oldest first, each with the reason it was left.
    history: list[tuple[str, str]] = field(default_factory=list)

    def next_epoch(self, reason: str) -> LunState:
        """This state in a fresh epoch (a copy: the caller saves it first)."""
        history = [*self.history, (self.epoch, reason)][-EPOCH_HISTORY:]
        return replace(self, epoch=new_epoch(), epoch_reason=reason, history=history, flag=False)


@dataclass
class Hold:
    name: str
    created_at: float
    token: str = ""
    changes: ChangeMap | None = None


@dataclass(frozen=True)
class CheckResult:
    intact: bool
    reason: str
    current: str | None


class StateStore(Protocol):
    """Where state goes; every call must be durable when it returns."""

    def save_state(self, state: LunState) -> None: ...

    def save_hold(self, lun_uuid: str, hold: Hold, state: LunState | None = None) -> None:
        """Save ``hold`` and, if given, ``state`` in one transaction."""

    def delete_hold(self, lun_uuid: str, name: str, state: LunState | None = None) -> None:
        """Delete the hold and, if given, save ``state`` in one transaction."""

    def save_change_maps(self, lun_uuid: str, holds: Iterable[Hold]) -> None: ...


def validate_mode(mode: str) -> TrackingMode:
    try:
        return TrackingMode(mode)
    except ValueError:
        raise InvalidArgument(f"invalid tracking mode {mode!r}: use {', '.join(MODES)}") from None


def validate_hold_name(name: str) -> str:
    if not name or len(name) > HOLD_NAME_MAX or not name.isprintable() or "/" in name:
        raise InvalidArgument(
            f"invalid hold name {name!r}: 1-{HOLD_NAME_MAX} printable characters, no '/'"
        )
    return name


def format_token(lun_uuid: str, epoch: str, mode: str, value: int) -> str:
    return f"{TOKEN_PREFIX}.{lun_uuid}.{epoch}.{mode}.{value}"


def parse_token(token: str) -> tuple[str, str, str, int] | None:
    parts = token.strip().split(".")
    if len(parts) != 5 or parts[0] != TOKEN_PREFIX or parts[3] not in MODES:
        return None
    if not _EPOCH_RE.fullmatch(parts[2]):
        return None
    try:
        parsed = parts[1], parts[2], parts[3], int(parts[4])
    except ValueError:
        return None
    # int() also takes " 1", "+1", "01" and "1_0": only the form the array issues counts.
    if format_token(*parsed) != ".".join(parts):
        return None
    return parsed


class StampWatch:
    """Knows the backing file's stamp after the array's own last change.

    Before the array's own changes, and whenever asked, the stamp is compared
    with the expected one: a difference means another process wrote the file
    (C5 while running).  Cost: an ``fstat`` before a change and one after it;
    in a batch (:meth:`lunseal.engine.lun.Lun.batch`) one before its first
    change and one at its end.  A write by another process within the same
    timestamp tick as one of ours (the kernel stamps mtime/ctime with a coarse
    clock), or while a batch of our changes runs, leaves no trace; see
    docs/state-tokens.md.
    """

    def __init__(self, lun: Lun) -> None:
        self.lun = lun
        self._expected = lun.backend.stamp()
        self._foreign: list[str] = []
        #: An own change has started and its stamp is not taken yet (until the
        #: change, or the batch it belongs to, is done): the file may differ
        #: from the expected stamp by the array's own doing.
        self.changing = False

    def stamp(self) -> FileStamp | None:
        return self.lun.backend.stamp()

    def _compare(self) -> None:
        now = self.stamp()
        if now != self._expected and not self._foreign:
            if self._expected is None or now is None:
                self._foreign = ["the file's stamp appeared or vanished"]
            else:
                self._foreign = self._expected.differences(now)

    def before_change(self) -> None:
        """Before an own change: remember a foreign one, if any.  Skipped while
        an earlier own change of the batch is unstamped: the file then differs
        from the expectation by the array's own doing."""
        if not self.changing:
            self._compare()
            self.changing = True

    def own_change_done(self) -> None:
        self._expected = self.stamp()
        self.changing = False

    def look(self) -> None:
        """Compare now.  With an own change unstamped (asked during a change or
        a batch), whatever the file shows is taken as the array's own doing; the
        change is still under way, so it is stamped again once done."""
        if self.changing:
            self._expected = self.stamp()
            return
        self._compare()

    def foreign_changes(self) -> list[str]:
        """What changed behind the array's back (empty: nothing) until :meth:`accept`."""
        self.look()
        return list(self._foreign)

    def accept(self) -> None:
        """The foreign change is recorded (new epoch): the current stamp is expected."""
        self._foreign = []
        self._expected = self.stamp()


P = ParamSpec("P")
R = TypeVar("R")


def _locked(
    method: Callable[Concatenate[StateTracker, P], R],
) -> Callable[Concatenate[StateTracker, P], R]:
    """Run a tracker method under the tracker's lock.

    A tracker is driven from its LUN's worker (writes, API calls), but a mirror
    source's worker also writes *into* the target LUN (fan-out), so the target's
    tracker can be reached from two threads; the lock keeps each call whole.
    Uncontended it costs well under a microsecond per write."""

    def wrapper(self: StateTracker, /, *args: P.args, **kwargs: P.kwargs) -> R:
        with self._lock:
            return method(self, *args, **kwargs)

    functools.update_wrapper(wrapper, method)
    return wrapper


class StateTracker:
    """State of one LUN; registered as the LUN's first change listener.

    A LUN with a backing file gets a :class:`StampWatch`, so writes by other
    processes show (see :meth:`verify`).
    """

    def __init__(
        self,
        lun: Lun,
        store: StateStore,
        state: LunState,
        holds: dict[str, Hold] | None = None,
        *,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.lun = lun
        self.store = store
        self.state = state
        self.holds: dict[str, Hold] = holds or {}
        self._clock = clock
        self._monotonic = monotonic
        self._last_change = 0.0
        self._lock = threading.RLock()
        #: How often the token (epoch or value) moved, for metrics.
        self.token_changes = 0
        #: Batches of the LUN running now (nested ones count): the stamp after
        #: their changes is taken once, when the outermost one ends.
        self._batches = 0
        self.watch: StampWatch | None = None
        if lun.backend.stamp() is not None:
            self.watch = StampWatch(lun)
            lun.change_done.append(self._own_change_done)
            lun.batch_hooks.append(self)
        lun.listeners.insert(0, self.on_change)

    @property
    def tracking(self) -> bool:
        return bool(self.holds)

    @property
    def dirty(self) -> bool:
        return not self.state.clean

    def _commit(self, state: LunState) -> None:
        """Save, then adopt: a catalog failure leaves the state as it was."""
        self.store.save_state(state)
        if (state.epoch, state.value) != (self.state.epoch, self.state.value):
            self.token_changes += 1
        self.state = state

    # -- the write path -----------------------------------------------------------
    # The per-change methods take the lock inline (a decorator's call frame
    # costs more than the uncontended lock itself).

    def begin_batch(self) -> None:
        with self._lock:
            self._batches += 1

    def end_batch(self) -> None:
        with self._lock:
            self._batches -= 1
            watch = self.watch
            if not self._batches and watch is not None and watch.changing:
                watch.own_change_done()

    def _own_change_done(self, lun: Lun) -> None:
        with self._lock:
            # In a batch the stamp waits for its end: one fstat per batch.  The
            # count is only changed under the lock, so a write from another
            # thread (a mirror's fan-out) that defers here is stamped by the end.
            if self.watch is not None and not self._batches:
                self.watch.own_change_done()

    def on_change(self, lun: Lun, offset: int, length: int) -> None:
        with self._lock:
            if self.watch is not None:
                self.watch.before_change()
            if self.state.clean:
                self.verify()
                # Durable before the change reaches the backend: a crash from here
                # on is recovered with a new epoch.  The fresh random epoch makes
                # this busy period's tokens unrepeatable by any other history (a
                # rolled back or cloned data directory).  If the save fails, the
                # change is refused (the caller sees EIO), nothing is acknowledged.
                self._commit(replace(self.state.next_epoch(WRITTEN), clean=False))
            self._last_change = self._monotonic()
            if self.holds:
                self._advance()
                for hold in self.holds.values():
                    if hold.changes is not None:
                        hold.changes.mark(offset, length)

    def _advance(self) -> None:
        mode = self.state.mode
        if mode == TrackingMode.COUNTER:
            self.state.value += 1
            self.token_changes += 1
        elif mode == TrackingMode.TIMESTAMP:
            self.state.value = max(self._clock(), self.state.value + 1)
            self.token_changes += 1
        else:
            self.state.flag = True

    def _transition(self, state: LunState) -> LunState:
        """Tracking turns on or off: the state changes whatever the mode (C4)."""
        self.token_changes += 1  # counted here: the callers adopt it without _commit
        if state.mode == TrackingMode.TIMESTAMP:
            value = max(self._clock(), state.value + 1)
        else:
            value = state.value + 1
        return replace(state, value=value, flag=False)

    # -- another process writing the backing file ------------------------------------

    @_locked
    def verify(self) -> None:
        """New epoch if the backing file changed other than through this array.

        Cheap (one ``fstat``): called at every token issue, check and checkpoint.
        """
        if self.watch is None:
            return
        found = self.watch.foreign_changes()
        if not found:
            return
        reason = f"{FOREIGN} ({', '.join(found)})"
        state = self.state.next_epoch(reason)
        self._mark_all_changed()
        if state.clean:
            self._record_clean(self.watch.stamp(), state)
        else:
            self.store.save_change_maps(self.lun.record.uuid, self.holds.values())
            self._commit(state)
        # Only now: if the catalog failed, the next look finds the change again.
        self.watch.accept()
        log.warning("LUN %s: new state epoch %s: %s", self.lun.name, state.epoch, reason)

    def _mark_all_changed(self) -> None:
        for hold in self.holds.values():
            if hold.changes is not None:
                # The recorded map may predate a grow: cover the LUN's whole current size.
                hold.changes.resize(self.lun.size)
                hold.changes.mark_all()

    # -- tokens ---------------------------------------------------------------------

    @_locked
    def token(self) -> str:
        if not self.holds:
            raise Conflict(
                f"state tracking is off for LUN {self.lun.name}: acquire a hold first "
                "(lunseal state enable)"
            )
        self.verify()
        if self.state.flag:
            # Flag mode: the flag says "changed since the last token"; issuing a
            # token re-arms it, so the value moves on and stays put until the next change.
            self._commit(replace(self.state, value=self.state.value + 1, flag=False))
        s = self.state
        return format_token(self.lun.record.uuid, s.epoch, s.mode, s.value)

    @_locked
    def check(self, token: str) -> CheckResult:
        parsed = parse_token(token)
        if parsed is None:
            raise InvalidArgument(
                f"not a lunseal state token: {token[:80]!r} (expected "
                f"{TOKEN_PREFIX}.<LUN uuid>.<epoch>.<mode>.<value>, as printed by state get)"
            )
        lun_uuid, epoch, mode, value = parsed
        if lun_uuid != self.lun.record.uuid:
            return CheckResult(
                False,
                f"the token belongs to another LUN ({lun_uuid}); LUN {self.lun.name} is "
                f"{self.lun.record.uuid} (deleted and re-created, or a different LUN)",
                None,
            )
        if not self.holds:
            return CheckResult(
                False, "state tracking is off, so changes since the token cannot be ruled out", None
            )
        current = self.token()
        s = self.state
        if epoch != s.epoch:
            return CheckResult(False, f"epoch {epoch} -> {s.epoch}: {self._why(epoch)}", current)
        if mode != s.mode:
            return CheckResult(
                False, f"tracking was turned off and on again (mode {mode} -> {s.mode})", current
            )
        if value != s.value:
            return CheckResult(
                False,
                f"the LUN's state changed since the token was issued ({mode} {value} -> "
                f"{s.value}): data was written, or tracking was turned off and on",
                current,
            )
        return CheckResult(True, "no data-changing operation since the token was issued", current)

    def _why(self, epoch: str) -> str:
        """Why the state left ``epoch``, from the recorded history."""
        epochs = [e for e, _ in self.state.history]
        if epoch not in epochs:
            return (
                "the token's epoch is not in this LUN's recorded history: the data "
                "directory was restored from an older copy or cloned, or the token is "
                f"older than the last {EPOCH_HISTORY} epoch changes"
            )
        i = epochs.index(epoch)
        why = self.state.history[i][1]
        later = len(epochs) - i - 1
        return f"{why} (and {later} later epoch change(s))" if later else why

    # -- holds ----------------------------------------------------------------------

    @_locked
    def acquire(
        self,
        name: str = DEFAULT_HOLD,
        *,
        mode: str | None = None,
        granularity: int | None = None,
    ) -> tuple[Hold, str]:
        validate_hold_name(name)
        tracking = None if mode is None else validate_mode(mode)
        if name in self.holds:
            raise Conflict(f"LUN {self.lun.name} already has a hold named {name!r}")
        if self.holds and tracking is not None and tracking != self.state.mode:
            raise Conflict(
                f"LUN {self.lun.name} is tracked in {self.state.mode} mode by "
                f"{len(self.holds)} hold(s); a {tracking} hold must wait until they are released"
            )
        changes = None
        if granularity is not None:
            changes = ChangeMap(self.lun.size, granularity)  # 0 is invalid, not the default
        self.verify()
        # The first hold turns tracking on: the new state and the hold are saved
        # in one transaction, so a failure leaves neither (and nothing adopted).
        state = None
        if not self.holds:
            state = self._transition(replace(self.state, mode=tracking or DEFAULT_MODE))
        elif self.state.flag:
            # Flag mode, changed since the last token: the hold's token re-arms the
            # flag as token() does, or it would equal the token issued before the change.
            state = replace(self.state, value=self.state.value + 1, flag=False)
        s = state or self.state
        hold = Hold(name, time.time(), changes=changes)
        hold.token = format_token(self.lun.record.uuid, s.epoch, s.mode, s.value)
        self.store.save_hold(self.lun.record.uuid, hold, state)
        self.state = s
        self.holds[name] = hold
        log.info("LUN %s: hold %r acquired (%s mode)", self.lun.name, name, self.state.mode)
        return hold, hold.token

    @_locked
    def release(self, name: str = DEFAULT_HOLD) -> None:
        if name not in self.holds:
            raise NotFound(f"LUN {self.lun.name} has no hold named {name!r}")
        # Change the state when tracking stops (C4), in the hold's delete transaction.
        state = self._transition(self.state) if len(self.holds) == 1 else None
        self.store.delete_hold(self.lun.record.uuid, name, state)
        self.state = state or self.state
        del self.holds[name]
        log.info("LUN %s: hold %r released", self.lun.name, name)

    @_locked
    def hold(self, name: str) -> Hold:
        try:
            return self.holds[name]
        except KeyError:
            raise NotFound(f"LUN {self.lun.name} has no hold named {name!r}") from None

    # -- durability -------------------------------------------------------------------

    @_locked
    def recover(self) -> None:
        """At start-up: a new epoch if changes may have gone unrecorded (C1, C5)."""
        stamp = self.lun.backend.stamp()
        s = self.state
        if s.stamp is None and s.clean:
            self._record_clean(stamp, s)  # first start with tracking: take the baseline
            return
        reason = ""
        if not s.clean:
            reason = RECOVERED
        elif s.stamp is not None and stamp is not None and s.stamp != stamp:
            changed = ", ".join(s.stamp.differences(stamp))
            reason = f"the backing file changed while the array was down ({changed})"
        if not reason:
            return
        state = s.next_epoch(reason)
        log.warning("LUN %s: new state epoch %s: %s", self.lun.name, state.epoch, reason)
        self._mark_all_changed()
        self._record_clean(stamp, state)

    @_locked
    def checkpoint(self, idle: float) -> bool:
        """Record the exact state once changes have been idle for ``idle`` seconds."""
        self.verify()
        if self.state.clean or self._monotonic() - self._last_change < idle:
            return False
        self.lun.backend.flush()
        self._record_clean(self.lun.backend.stamp(), self.state)
        return True

    @_locked
    def close(self) -> None:
        """Clean shutdown: the caller has flushed the backend."""
        self.verify()
        if not self.state.clean:
            self._record_clean(self.lun.backend.stamp(), self.state)
        else:
            self.store.save_change_maps(self.lun.record.uuid, self.holds.values())

    def _record_clean(self, stamp: FileStamp | None, state: LunState) -> None:
        self.store.save_change_maps(self.lun.record.uuid, self.holds.values())
        self._commit(replace(state, stamp=stamp, clean=True))

    @_locked
    def repointed(self, reason: str) -> None:
        """The LUN now reads another backing file: no earlier token may match (C1).

        Called by the array after it swapped the backend; records the new
        file's stamp, so later checks (running or at start-up) compare against it.
        """
        state = self.state.next_epoch(reason)
        log.warning("LUN %s: new state epoch %s: %s", self.lun.name, state.epoch, reason)
        self._mark_all_changed()
        self._record_clean(self.lun.backend.stamp(), state)
        if self.watch is not None:
            self.watch.accept()
