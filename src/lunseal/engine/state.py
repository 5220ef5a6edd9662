"""LUN state tracking: holds, tokens and crash-safe state (DESIGN.md section 3).

A LUN's state is ``(epoch, mode, value)``; a token is that state plus the LUN's
UUID, as an opaque string.  The rules that make the contract hold:

* ``value`` only ever grows.  While tracking is on, every accepted change
  advances it (counter: +1; timestamp: the change's time, forced strictly
  increasing; flag: sets a dirty flag, and the next token issued bumps the
  value and clears the flag).  Turning tracking on or off advances it too (C4).
* Changes are seen through the LUN's change gate, before the backend is
  touched (C2).
* Crash safety without a cost per write: before the first change after a quiet
  period the LUN is durably marked *dirty*; once writes have been idle for a
  while, the backend is flushed and the exact state, the change maps and the
  backing file's stamp are recorded with the LUN marked *clean*.  At start-up
  a LUN found dirty, or whose backing file's stamp differs (C5), gets a new
  epoch, so no earlier token can match (C1) while an idle LUN keeps its
  tokens (C3).  Change maps of a LUN found dirty are marked entirely changed:
  they must cover every region that may have been written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Protocol

from lunseal.engine.backend import FileStamp
from lunseal.engine.changemap import ChangeMap
from lunseal.engine.lun import Lun
from lunseal.errors import Conflict, InvalidArgument, NotFound

log = logging.getLogger(__name__)

MODES = ("counter", "timestamp", "flag")
DEFAULT_MODE = "counter"
DEFAULT_HOLD = "default"
TOKEN_PREFIX = "lst1"
HOLD_NAME_MAX = 128


@dataclass
class LunState:
    """The persisted part of a LUN's state."""

    lun_uuid: str
    mode: str = DEFAULT_MODE
    epoch: int = 1
    value: int = 0
    flag: bool = False
    clean: bool = True
    stamp: FileStamp | None = None
    #: Why the epoch last changed, for ``check`` to explain itself.
    epoch_reason: str = ""


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

    def save_hold(self, lun_uuid: str, hold: Hold) -> None: ...

    def delete_hold(self, lun_uuid: str, name: str) -> None: ...

    def save_change_maps(self, lun_uuid: str, holds: Iterable[Hold]) -> None: ...


def validate_mode(mode: str) -> str:
    if mode not in MODES:
        raise InvalidArgument(f"invalid tracking mode {mode!r}: use {', '.join(MODES)}")
    return mode


def validate_hold_name(name: str) -> str:
    if not name or len(name) > HOLD_NAME_MAX or not name.isprintable() or "/" in name:
        raise InvalidArgument(
            f"invalid hold name {name!r}: 1-{HOLD_NAME_MAX} printable characters, no '/'"
        )
    return name


def format_token(lun_uuid: str, epoch: int, mode: str, value: int) -> str:
    return f"{TOKEN_PREFIX}.{lun_uuid}.{epoch}.{mode}.{value}"


def parse_token(token: str) -> tuple[str, int, str, int] | None:
    parts = token.strip().split(".")
    if len(parts) != 5 or parts[0] != TOKEN_PREFIX or parts[3] not in MODES:
        return None
    try:
        parsed = parts[1], int(parts[2]), parts[3], int(parts[4])
    except ValueError:
        return None
    # int() also takes " 1", "+1", "01" and "1_0": only the form the array issues counts.
    if format_token(*parsed) != ".".join(parts):
        return None
    return parsed


class StateTracker:
    """State of one LUN; registered as the LUN's first change listener."""

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
        lun.listeners.insert(0, self.on_change)

    @property
    def tracking(self) -> bool:
        return bool(self.holds)

    @property
    def dirty(self) -> bool:
        return not self.state.clean

    # -- the write path -----------------------------------------------------------

    def on_change(self, lun: Lun, offset: int, length: int) -> None:
        if self.state.clean:
            # Durable before the change reaches the backend: a crash from here on
            # is recovered with a new epoch.
            self.state.clean = False
            self.store.save_state(self.state)
        self._last_change = self._monotonic()
        if self.holds:
            self._advance()
            for hold in self.holds.values():
                if hold.changes is not None:
                    hold.changes.mark(offset, length)

    def _advance(self) -> None:
        mode = self.state.mode
        if mode == "counter":
            self.state.value += 1
        elif mode == "timestamp":
            self.state.value = max(self._clock(), self.state.value + 1)
        else:
            self.state.flag = True

    def _transition(self) -> None:
        """Tracking turns on or off: the state changes whatever the mode (C4)."""
        if self.state.mode == "timestamp":
            self.state.value = max(self._clock(), self.state.value + 1)
        else:
            self.state.value += 1
        self.state.flag = False

    # -- tokens ---------------------------------------------------------------------

    def token(self) -> str:
        if not self.holds:
            raise Conflict(
                f"state tracking is off for LUN {self.lun.name}: acquire a hold first "
                "(lunseal state enable)"
            )
        if self.state.flag:
            # Flag mode: the flag says "changed since the last token"; issuing a
            # token re-arms it, so the value moves on and stays put until the next change.
            self.state.value += 1
            self.state.flag = False
            self.store.save_state(self.state)
        s = self.state
        return format_token(self.lun.record.uuid, s.epoch, s.mode, s.value)

    def check(self, token: str) -> CheckResult:
        parsed = parse_token(token)
        if parsed is None:
            return CheckResult(False, "not a lunseal state token", None)
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
            why = s.epoch_reason or "the array recovered the LUN's state"
            return CheckResult(False, f"epoch {epoch} -> {s.epoch}: {why}", current)
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

    # -- holds ----------------------------------------------------------------------

    def acquire(
        self,
        name: str = DEFAULT_HOLD,
        *,
        mode: str | None = None,
        granularity: int | None = None,
    ) -> tuple[Hold, str]:
        validate_hold_name(name)
        if mode is not None:
            validate_mode(mode)
        if name in self.holds:
            raise Conflict(f"LUN {self.lun.name} already has a hold named {name!r}")
        if self.holds and mode is not None and mode != self.state.mode:
            raise Conflict(
                f"LUN {self.lun.name} is tracked in {self.state.mode} mode by "
                f"{len(self.holds)} hold(s); a {mode} hold must wait until they are released"
            )
        changes = None
        if granularity is not None:
            changes = ChangeMap(self.lun.size, granularity)  # 0 is invalid, not the default
        if not self.holds:
            self.state.mode = mode or DEFAULT_MODE
            self._transition()
        hold = Hold(name, time.time(), changes=changes)
        self.holds[name] = hold
        self.store.save_state(self.state)
        hold.token = self.token()
        self.store.save_hold(self.lun.record.uuid, hold)
        log.info("LUN %s: hold %r acquired (%s mode)", self.lun.name, name, self.state.mode)
        return hold, hold.token

    def release(self, name: str = DEFAULT_HOLD) -> None:
        if name not in self.holds:
            raise NotFound(f"LUN {self.lun.name} has no hold named {name!r}")
        if len(self.holds) == 1:
            # Change the state before tracking stops, as the seed prescribes.
            self._transition()
        del self.holds[name]
        self.store.save_state(self.state)
        self.store.delete_hold(self.lun.record.uuid, name)
        log.info("LUN %s: hold %r released", self.lun.name, name)

    def hold(self, name: str) -> Hold:
        try:
            return self.holds[name]
        except KeyError:
            raise NotFound(f"LUN {self.lun.name} has no hold named {name!r}") from None

    # -- durability -------------------------------------------------------------------

    def recover(self) -> None:
        """At start-up: a new epoch if changes may have gone unrecorded (C1, C5)."""
        stamp = self.lun.backend.stamp()
        s = self.state
        if s.stamp is None and s.clean:
            self._record_clean(stamp)  # first start with tracking: take the baseline
            return
        reason = ""
        if not s.clean:
            reason = "recovered after an unclean shutdown: changes may not have been recorded"
        elif s.stamp is not None and stamp is not None and s.stamp != stamp:
            changed = ", ".join(s.stamp.differences(stamp))
            reason = f"the backing file changed while the array was down ({changed})"
        if not reason:
            return
        log.warning("LUN %s: new state epoch %d: %s", self.lun.name, s.epoch + 1, reason)
        s.epoch += 1
        s.epoch_reason = reason
        s.flag = False
        for hold in self.holds.values():
            if hold.changes is not None:
                # The recorded map may predate a grow: cover the LUN's whole current size.
                hold.changes.resize(self.lun.size)
                hold.changes.mark_all()
        self._record_clean(stamp)

    def checkpoint(self, idle: float) -> bool:
        """Record the exact state once changes have been idle for ``idle`` seconds."""
        if self.state.clean or self._monotonic() - self._last_change < idle:
            return False
        self.lun.backend.flush()
        self._record_clean(self.lun.backend.stamp())
        return True

    def close(self) -> None:
        """Clean shutdown: the caller has flushed the backend."""
        if not self.state.clean:
            self._record_clean(self.lun.backend.stamp())
        else:
            self.store.save_change_maps(self.lun.record.uuid, self.holds.values())

    def _record_clean(self, stamp: FileStamp | None) -> None:
        self.store.save_change_maps(self.lun.record.uuid, self.holds.values())
        self.state.stamp = stamp
        self.state.clean = True
        self.store.save_state(self.state)

    def repointed(self, reason: str) -> None:
        """The LUN now reads another backing file: no earlier token may match (C1).

        Called by the array after it swapped the backend; records the new
        file's stamp, so a later start compares against the new file.
        """
        s = self.state
        s.epoch += 1
        s.epoch_reason = reason
        s.flag = False
        log.warning("LUN %s: new state epoch %d: %s", self.lun.name, s.epoch, reason)
        for hold in self.holds.values():
            if hold.changes is not None:
                hold.changes.resize(self.lun.size)
                hold.changes.mark_all()
        self._record_clean(self.lun.backend.stamp())
