"""State tokens (docs/design.md, C1-C6) in the engine: trackers, holds, durability.

Two kinds of set-up: a bare :class:`StateTracker` on an in-memory LUN with a
real SQLite store (for injected clocks and backend spies), and a real
:class:`Array` on real files, closed cleanly or abandoned as a ``kill -9``
would leave it (:func:`abandon`).
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import sqlite3
import time
import uuid as uuidlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.memory import MemoryBackend
from lunseal.engine.catalog import migrate
from lunseal.engine.lun import Lun, LunRecord
from lunseal.engine.state.changemap import ChangedExtent
from lunseal.engine.state.store import SqliteStateStore
from lunseal.engine.state.tracker import (
    MODES,
    LunState,
    StateTracker,
    format_token,
    parse_token,
)
from lunseal.errors import Conflict, InvalidArgument, NoSpace, NotFound, ReadOnly
from tests.support.arrays import Arrays

KiB = 1 << 10
MiB = 1 << 20


# -- set-up: a bare tracker --------------------------------------------------------------


class SpyBackend(MemoryBackend):
    """Calls ``touched(op)`` as its first act in every data-changing method."""

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self.touched: Callable[[str], None] = lambda op: None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.touched("write")
        super().write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self.touched("trim")
        super().trim(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self.touched("zero")
        super().zero(offset, length, may_trim=may_trim, fast_only=fast_only)

    def resize(self, size: int) -> None:
        self.touched("grow")
        super().resize(size)

    def flush(self) -> None:
        self.touched("flush")
        super().flush()


def open_db(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


class Bare:
    """One LUN on a spy backend with a tracker persisted to a real SQLite file."""

    def __init__(
        self,
        tmp_path: Path,
        *,
        size: int = MiB,
        read_only: bool = False,
        clock: Callable[[], int] = time.time_ns,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.db_path = tmp_path / "state.sqlite"
        self.db = open_db(self.db_path)
        migrate(self.db)  # the catalog's tables, without its LUN records
        self.store = SqliteStateStore(self.db)
        record = LunRecord(
            uuid=str(uuidlib.uuid4()),
            name="bare",
            number=0,
            size=size,
            backend="memory",
            path="",
            owned=False,
            read_only=read_only,
            created_at=0.0,
        )
        self.backend = SpyBackend(size)
        self.lun = Lun(record, self.backend)
        self.tracker = StateTracker(
            self.lun, self.store, LunState(record.uuid), clock=clock, monotonic=monotonic
        )
        self.tracker.recover()

    def persisted(self) -> LunState:
        """The state as another process would read it from the database file."""
        with open_db(self.db_path) as other:
            state = SqliteStateStore(other).load_state(self.lun.record.uuid)
        other.close()
        assert state is not None
        return state


@pytest.fixture
def bare(tmp_path: Path) -> Iterator[Bare]:
    b = Bare(tmp_path)
    yield b
    b.db.close()


#: Every data-changing operation, applied to a LUN.
CHANGES: dict[str, Callable[[Lun], None]] = {
    "write": lambda lun: lun.write(4096, b"x" * 100),
    "write-fua": lambda lun: lun.write(0, b"y", fua=True),
    "trim": lambda lun: lun.trim(8192, 4096),
    "zero": lambda lun: lun.zero(0, 512, may_trim=False),
    "zero-may-trim": lambda lun: lun.zero(65536, 65536, may_trim=True),
    "grow": lambda lun: lun.grow(lun.size + 512),
}

#: Operations that must never change a token.
NON_CHANGES: dict[str, Callable[[Lun], object]] = {
    "read": lambda lun: lun.read(0, 4096),
    "read-slice": lambda lun: lun.read_slice(0, 4096),
    "flush": lambda lun: lun.flush(),
    "cache": lambda lun: lun.cache(0, 65536),
    "extents": lambda lun: lun.extents(0, lun.size),
}


# -- set-up: real arrays on real files -------------------------------------------------------


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


@pytest.fixture
def array(arrays: Arrays) -> Array:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    return arr


# -- tokens: format and tracking on/off ----------------------------------------------------------


def test_token_names_the_lun_uuid_epoch_mode_and_value(bare: Bare) -> None:
    _hold, token = bare.tracker.acquire("job")
    parsed = parse_token(token)
    assert parsed is not None
    lun_uuid, epoch, mode, _value = parsed
    assert (lun_uuid, epoch, mode) == (bare.lun.record.uuid, bare.tracker.state.epoch, "counter")
    assert re.fullmatch(r"[0-9a-f]{16}", epoch)  # 64 random bits
    assert token.startswith("lst1.")
    assert format_token(*parsed) == token


def test_no_token_while_tracking_is_off(bare: Bare) -> None:
    with pytest.raises(Conflict, match="tracking is off"):
        bare.tracker.token()
    bare.tracker.acquire("job")
    bare.tracker.release("job")
    with pytest.raises(Conflict, match="tracking is off"):
        bare.tracker.token()


def test_check_while_tracking_is_off_is_changed(bare: Bare) -> None:
    _hold, token = bare.tracker.acquire("job")
    bare.tracker.release("job")
    result = bare.tracker.check(token)
    assert not result.intact
    assert "tracking is off" in result.reason
    assert result.current is None


@pytest.mark.parametrize("mode", MODES)
def test_the_first_hold_sets_the_mode(bare: Bare, mode: str) -> None:
    hold, token = bare.tracker.acquire("job", mode=mode)
    assert bare.tracker.state.mode == mode
    assert f".{mode}." in token
    assert hold.token == token == bare.tracker.token()


def test_default_mode_is_counter_and_default_hold_is_default(bare: Bare) -> None:
    hold, _token = bare.tracker.acquire()
    assert hold.name == "default"
    assert bare.tracker.state.mode == "counter"


# -- what changes a token and what does not -------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", sorted(NON_CHANGES))
def test_non_changing_operations_keep_the_token(bare: Bare, mode: str, op: str) -> None:
    bare.lun.write(0, b"data")  # something to read
    _hold, token = bare.tracker.acquire("job", mode=mode)
    bare.tracker.checkpoint(0)
    for _ in range(3):
        NON_CHANGES[op](bare.lun)
        assert bare.tracker.token() == token
    result = bare.tracker.check(token)
    assert result.intact, result.reason
    assert result.current == token
    # Nor do they make the LUN dirty: a crash now must not cost the token.
    assert not bare.tracker.dirty


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", sorted(CHANGES))
def test_every_data_change_changes_the_token(bare: Bare, mode: str, op: str) -> None:
    _hold, token = bare.tracker.acquire("job", mode=mode)
    seen = {token}
    for _ in range(3):
        CHANGES[op](bare.lun)
        new = bare.tracker.token()
        assert new not in seen
        seen.add(new)
    result = bare.tracker.check(token)
    assert not result.intact
    # The first change of a busy period starts a new epoch; check says why.
    assert "data was written since the token" in result.reason
    assert result.current == bare.tracker.token()


@pytest.mark.parametrize("mode", MODES)
def test_refused_writes_are_not_changes(tmp_path: Path, mode: str) -> None:
    b = Bare(tmp_path)
    _hold, token = b.tracker.acquire("job", mode=mode)
    with pytest.raises(NoSpace):
        b.lun.write(b.lun.size - 1, b"xx")
    with pytest.raises(NoSpace):
        b.lun.trim(b.lun.size, 512)
    assert b.tracker.token() == token
    b.db.close()


@pytest.mark.parametrize("mode", MODES)
def test_writes_refused_by_a_read_only_lun_are_not_changes(tmp_path: Path, mode: str) -> None:
    ro = Bare(tmp_path, read_only=True)
    _hold, token = ro.tracker.acquire("job", mode=mode)
    for op in ("write", "trim", "zero"):
        with pytest.raises(ReadOnly):
            CHANGES[op](ro.lun)
    assert ro.tracker.token() == token
    ro.db.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("op", ["write", "trim", "zero", "grow"])
def test_the_state_changes_before_the_backend_is_touched(bare: Bare, mode: str, op: str) -> None:
    """C2: the backend, at its first instruction, already sees the new state, and the
    dirty mark is already durable (visible to another database connection)."""
    _hold, token = bare.tracker.acquire("job", mode=mode)
    bare.tracker.checkpoint(0)
    assert bare.persisted().clean
    seen: list[tuple[str, str, bool]] = []
    bare.backend.touched = lambda what: seen.append(
        (what, bare.tracker.token(), bare.persisted().clean)
    )
    CHANGES[op](bare.lun)
    assert len(seen) == 1
    what, during, persisted_clean = seen[0]
    assert what == op
    assert during != token
    assert bare.tracker.check(token).intact is False
    assert not persisted_clean
    assert bare.tracker.token() == during  # nothing else happens after the backend call


def test_counter_mode_counts(bare: Bare) -> None:
    _hold, token = bare.tracker.acquire("job", mode="counter")
    start = parse_token(token)
    assert start is not None
    for i in range(1, 6):
        bare.lun.write(0, b"x")
        now = parse_token(bare.tracker.token())
        assert now is not None
        assert now[3] == start[3] + i


def test_timestamp_mode_uses_the_clock(tmp_path: Path) -> None:
    now = [1_000_000]
    b = Bare(tmp_path, clock=lambda: now[0])
    b.tracker.acquire("job", mode="timestamp")
    now[0] = 5_000_000
    b.lun.write(0, b"x")
    parsed = parse_token(b.tracker.token())
    assert parsed is not None
    assert parsed[3] == 5_000_000
    b.db.close()


def test_timestamp_mode_stays_strictly_increasing_when_the_clock_steps_back(
    tmp_path: Path,
) -> None:
    steps = itertools.cycle([10_000, 9_000, 9_000, 5, 10_000, 20_000, 19_999, 0, 20_000])
    b = Bare(tmp_path, clock=lambda: next(steps))
    _hold, token = b.tracker.acquire("a", mode="timestamp")
    values: list[int] = []
    tokens = {token}
    for i in range(60):
        if i % 7 == 3:
            b.tracker.release("a")
            _hold, token = b.tracker.acquire("a", mode="timestamp")
        else:
            CHANGES[["write", "trim", "zero", "grow"][i % 4]](b.lun)
            token = b.tracker.token()
        parsed = parse_token(token)
        assert parsed is not None
        values.append(parsed[3])
        assert token not in tokens
        tokens.add(token)
    assert values == sorted(values)
    assert len(set(values)) == len(values)
    b.db.close()


def test_flag_mode_semantics(bare: Bare) -> None:
    _hold, t1 = bare.tracker.acquire("job", mode="flag")
    assert bare.tracker.token() == t1  # two reads, no write: equal
    bare.lun.write(0, b"x")
    t2 = bare.tracker.token()
    assert t2 != t1  # a write after a token: changed
    assert bare.tracker.token() == t2
    assert bare.tracker.token() == t2
    for _ in range(5):
        bare.lun.write(0, b"x")  # many writes between two tokens: one step
    t3 = bare.tracker.token()
    p2, p3 = parse_token(t2), parse_token(t3)
    assert p2 is not None
    assert p3 is not None
    assert p3[3] == p2[3] + 1
    assert not bare.tracker.check(t1).intact
    assert not bare.tracker.check(t2).intact
    assert bare.tracker.check(t3).intact


def test_flag_mode_check_sees_a_write_made_after_the_token(bare: Bare) -> None:
    """check() must not miss the flag: the write happened after the token, no token
    was issued since, and the check is the first to look."""
    _hold, token = bare.tracker.acquire("job", mode="flag")
    bare.lun.write(0, b"x")
    result = bare.tracker.check(token)
    assert not result.intact
    assert result.current is not None
    assert result.current != token


def test_flag_mode_a_second_hold_after_a_write_gets_a_new_token(bare: Bare) -> None:
    """C1: the second hold's token is issued after the write, so it must differ from
    the token issued before it (and a later token equals it: no change since)."""
    _hold, before = bare.tracker.acquire("job", mode="flag")
    bare.lun.write(0, b"x")
    _hold, second = bare.tracker.acquire("second")
    assert second != before
    assert not bare.tracker.check(before).intact
    assert bare.tracker.token() == second
    assert bare.persisted() == bare.tracker.state  # the re-armed flag is durable


def test_flag_mode_flag_is_not_lost_by_a_checkpoint_and_restart(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    _hold, token = arr.tracker("a").acquire("job", mode="flag")
    arr.lun("a").write(0, b"x")
    arr.checkpoint(0)  # records flag=True, clean
    arr = arrays.crash()
    assert not arr.tracker("a").check(token).intact
    arr = arrays.restart()
    assert not arr.tracker("a").check(token).intact


# -- holds -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_one_holder_releasing_never_changes_anothers_token(bare: Bare, mode: str) -> None:
    t = bare.tracker
    _a, token_a = t.acquire("a", mode=mode)
    _b, token_b = t.acquire("b")
    assert token_b == token_a  # a second hold is no change
    _c, token_c = t.acquire("c", mode=mode)
    assert token_c == token_a
    t.release("a")
    assert t.token() == token_a
    t.release("c")
    assert t.token() == token_a
    assert t.check(token_a).intact
    assert set(t.holds) == {"b"}
    assert t.tracking


@pytest.mark.parametrize("mode", MODES)
def test_the_last_release_changes_the_state_before_tracking_stops(bare: Bare, mode: str) -> None:
    t = bare.tracker
    _a, _token = t.acquire("a", mode=mode)
    before = bare.persisted()
    t.release("a")
    after = bare.persisted()
    assert (after.epoch, after.value) != (before.epoch, before.value)
    assert after.value > before.value
    assert not t.tracking


@pytest.mark.parametrize("mode", MODES)
def test_reacquire_never_repeats_a_token(bare: Bare, mode: str) -> None:
    """C4: no token spans an off period, even if nothing was written meanwhile."""
    t = bare.tracker
    seen: set[str] = set()
    for i in range(6):
        _h, token = t.acquire(f"h{i % 2}", mode=mode)
        assert token not in seen
        seen.add(token)
        if i % 3 == 1:
            bare.lun.write(0, b"x")
            seen.add(t.token())
        t.release(f"h{i % 2}")
    _h, last = t.acquire("final", mode=mode)
    assert last not in seen
    for old in seen:
        assert not t.check(old).intact


def test_off_on_across_modes_never_repeats_a_token(bare: Bare) -> None:
    t = bare.tracker
    seen: set[str] = set()
    for mode in ["counter", "timestamp", "flag", "counter", "flag", "timestamp", "counter"]:
        _h, token = t.acquire("h", mode=mode)
        assert token not in seen
        seen.add(token)
        t.release("h")


def test_writes_while_tracking_is_off_are_never_hidden(bare: Bare) -> None:
    t = bare.tracker
    _h, token = t.acquire("h")
    t.release("h")
    bare.lun.write(0, b"x")
    _h, again = t.acquire("h")
    assert again != token
    assert not t.check(token).intact


def test_duplicate_hold_is_a_conflict_and_changes_nothing(bare: Bare) -> None:
    _h, token = bare.tracker.acquire("job")
    with pytest.raises(Conflict, match="already has a hold named 'job'"):
        bare.tracker.acquire("job")
    assert bare.tracker.token() == token
    assert list(bare.tracker.holds) == ["job"]


def test_a_hold_asking_for_another_mode_must_wait(bare: Bare) -> None:
    _h, token = bare.tracker.acquire("a", mode="counter")
    with pytest.raises(Conflict, match="counter mode"):
        bare.tracker.acquire("b", mode="flag")
    assert list(bare.tracker.holds) == ["a"]
    assert bare.tracker.token() == token
    bare.tracker.acquire("b", mode="counter")
    bare.tracker.acquire("c")  # no mode: takes what is there
    assert bare.tracker.state.mode == "counter"


@pytest.mark.parametrize("mode", ["", "COUNTER", "seq", "time"])
def test_bad_modes_are_refused(bare: Bare, mode: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid tracking mode"):
        bare.tracker.acquire("job", mode=mode)
    assert not bare.tracker.tracking


@pytest.mark.parametrize("name", ["", "a/b", "x" * 129, "tab\there", "new\nline"])
def test_bad_hold_names_are_refused(bare: Bare, name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid hold name"):
        bare.tracker.acquire(name)
    assert not bare.tracker.tracking


@pytest.mark.parametrize("granularity", [0, 1000, 2 * KiB, 3 * 4096, 2 << 30])
def test_bad_granularity_is_refused_and_changes_nothing(bare: Bare, granularity: int) -> None:
    before = bare.persisted()
    with pytest.raises(InvalidArgument, match="granularity"):
        bare.tracker.acquire("job", granularity=granularity)
    assert not bare.tracker.tracking
    assert bare.persisted() == before


def test_unknown_holds_are_not_found(bare: Bare) -> None:
    with pytest.raises(NotFound):
        bare.tracker.release("nobody")
    bare.tracker.acquire("job")
    with pytest.raises(NotFound):
        bare.tracker.release("nobody")
    with pytest.raises(NotFound):
        bare.tracker.hold("nobody")
    assert bare.tracker.hold("job").name == "job"


# -- checking tokens ---------------------------------------------------------------------------


def test_malformed_tokens_are_invalid_and_foreign_ones_changed(bare: Bare) -> None:
    _h, token = bare.tracker.acquire("job")
    prefix, lun_uuid, epoch, mode, value = token.split(".")
    malformed = [
        "",
        "   ",
        "garbage",
        token + ".1",
        ".".join([prefix, lun_uuid, epoch, mode]),
        ".".join(["lst2", lun_uuid, epoch, mode, value]),
        ".".join([prefix, lun_uuid, epoch, "bogus", value]),
        ".".join([prefix, lun_uuid, "one", mode, value]),
        ".".join([prefix, lun_uuid, epoch, mode, "x"]),
        ".".join([prefix, lun_uuid, epoch, mode, ""]),
        # numbers that parse to the right value but were never issued in this form
        ".".join([prefix, lun_uuid, "0" + epoch, mode, value]),
        ".".join([prefix, lun_uuid, epoch.upper(), mode, value]),
        ".".join([prefix, lun_uuid, epoch + "0", mode, value]),
        ".".join([prefix, lun_uuid, "01", mode, value]),
        ".".join([prefix, lun_uuid, epoch, mode, "0" + value]),
        ".".join([prefix, lun_uuid, epoch, mode, "+" + value]),
        ".".join([prefix, lun_uuid, epoch, mode, " " + value]),
        ".".join([prefix, lun_uuid, epoch, mode, value + "_0"]),
        token.replace(".", ",", 1),
        token.upper(),
    ]
    for text in malformed:
        with pytest.raises(InvalidArgument, match="not a lunseal state token"):
            bare.tracker.check(text)
    well_formed_but_other = [
        ".".join([prefix, lun_uuid, epoch, "flag", value]),
        ".".join([prefix, lun_uuid.upper(), epoch, mode, value]),
        ".".join([prefix, str(uuidlib.uuid4()), epoch, mode, value]),
        ".".join([prefix, lun_uuid, "0123456789abcdef", mode, value]),
        ".".join([prefix, lun_uuid, "7", mode, value]),  # a schema-1 epoch
        ".".join([prefix, lun_uuid, epoch, mode, str(int(value) + 1)]),
    ]
    for text in well_formed_but_other:
        result = bare.tracker.check(text)
        assert not result.intact, text
        assert result.reason, text
    assert bare.tracker.check(token).intact
    assert bare.tracker.check(f" {token}\n").intact  # copy-paste whitespace is fine


def test_check_explains_an_epoch_change(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    _h, before = arr.tracker("a").acquire("job")
    arr.lun("a").write(0, b"x")
    token = arr.tracker("a").token()
    arr = arrays.crash()
    result = arr.tracker("a").check(token)
    assert not result.intact
    assert "data was written since the token" in arr.tracker("a").check(before).reason
    epoch = arr.tracker("a").state.epoch
    assert re.search(
        rf"epoch [0-9a-f]{{16}} -> {epoch}: recovered after an unclean shutdown", result.reason
    )


# -- LUN identity: C6 and C1 across delete/re-create ---------------------------------------------


def test_tokens_of_two_luns_never_compare_equal(array: Array) -> None:
    array.create_lun("b", MiB)
    ta, tb = array.tracker("a"), array.tracker("b")
    tokens_a: set[str] = set()
    tokens_b: set[str] = set()
    for mode in MODES:
        tokens_a.add(ta.acquire("h", mode=mode)[1])
        tokens_b.add(tb.acquire("h", mode=mode)[1])
        for lun in (array.lun("a"), array.lun("b")):
            lun.write(0, b"same")
        tokens_a.add(ta.token())
        tokens_b.add(tb.token())
        ta.release("h")
        tb.release("h")
    assert not tokens_a & tokens_b
    tb.acquire("h")
    for token in tokens_a:
        result = tb.check(token)
        assert not result.intact
        assert "another LUN" in result.reason


@pytest.mark.parametrize("external", [False, True], ids=["owned", "external-file"])
@pytest.mark.parametrize("mode", MODES)
def test_delete_and_recreate_never_matches_an_old_token(
    arrays: Arrays, tmp_path: Path, mode: str, external: bool
) -> None:
    """Same name, same number, same size, same history of operations, even the same
    backing file: still a different LUN."""
    path: Path | None = None
    if external:
        path = tmp_path / "disk.img"
        with path.open("wb") as f:
            f.truncate(MiB)
    arr = arrays.open()
    old: set[str] = set()
    for _round in range(3):
        lun = arr.create_lun("x", MiB, number=7, path=path)
        assert lun.record.owned is not external
        tracker = arr.tracker("x")
        _h, token = tracker.acquire("job", mode=mode)
        assert token not in old
        for known in old:
            result = tracker.check(known)
            assert not result.intact
            assert "another LUN" in result.reason
        old.add(token)
        lun.write(0, b"x")
        old.add(tracker.token())
        arr = arrays.restart()
        assert arr.tracker("x").token() in old  # the restart itself keeps the token
        arr.delete_lun("x")
        assert external is (path is not None and path.exists())
    arr = arrays.restart()
    arr.create_lun("x", MiB, number=7, path=path)
    _h, token = arr.tracker("x").acquire("job", mode=mode)
    assert token not in old


# -- durability: clean restarts, crashes, checkpoints ----------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_clean_restart_keeps_tokens(arrays: Arrays, mode: str) -> None:
    """C3 across clean restarts, with the LUN clean or dirty at shutdown."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.create_lun("b", MiB)
    _h, before_write = arr.tracker("a").acquire("job", mode=mode)
    _h, idle = arr.tracker("b").acquire("job", mode=mode)
    arr.lun("a").write(0, b"x")
    after_write = arr.tracker("a").token()
    assert arr.tracker("a").dirty  # no checkpoint: close must record the state
    for _ in range(3):
        arr = arrays.restart()
        assert arr.tracker("a").token() == after_write
        assert arr.tracker("a").check(after_write).intact
        assert not arr.tracker("a").check(before_write).intact
        assert arr.tracker("b").token() == idle


@pytest.mark.parametrize("mode", MODES)
def test_a_crash_with_unrecorded_changes_changes_every_token(arrays: Arrays, mode: str) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    _h, t0 = tracker.acquire("job", mode=mode)
    arr.lun("a").write(0, b"x")
    t1 = tracker.token()  # read after the write: reflects it, but not recorded clean
    arr = arrays.crash()
    tracker = arr.tracker("a")
    for token, why in ((t0, "data was written"), (t1, "unclean shutdown")):
        result = tracker.check(token)
        assert not result.intact
        assert why in result.reason
    assert tracker.token() not in {t0, t1}
    assert not tracker.dirty  # recovery records the new epoch at once


@pytest.mark.parametrize("mode", MODES)
def test_a_crash_after_a_checkpoint_keeps_tokens(arrays: Arrays, mode: str) -> None:
    """C3 across a crash: the LUN had nothing unrecorded."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.create_lun("untouched", MiB)
    _h, t0 = arr.tracker("a").acquire("job", mode=mode)
    _h, u0 = arr.tracker("untouched").acquire("job", mode=mode)
    arr.lun("a").write(0, b"x")
    t1 = arr.tracker("a").token()
    arr.checkpoint(0)
    assert not arr.tracker("a").dirty
    arr = arrays.crash()
    assert arr.tracker("a").check(t1).intact
    assert not arr.tracker("a").check(t0).intact
    assert arr.tracker("untouched").check(u0).intact
    # ... and a crash after the first write that follows the checkpoint does not.
    arr.lun("a").write(0, b"y")
    arr = arrays.crash()
    assert not arr.tracker("a").check(t1).intact
    assert arr.tracker("untouched").check(u0).intact


def test_a_crash_while_tracking_is_off_is_still_seen(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    _h, token = arr.tracker("a").acquire("job")
    arr.tracker("a").release("job")
    arr.lun("a").write(0, b"x")
    arr = arrays.crash()
    _h, again = arr.tracker("a").acquire("job")
    assert again != token
    assert not arr.tracker("a").check(token).intact


def test_repeated_crashes_never_reuse_an_epoch(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("job")
    seen: set[str] = set()
    for i in range(5):
        arr.lun("a").write(0, bytes([i]))
        seen.add(arr.tracker("a").token())
        arr = arrays.crash()
        token = arr.tracker("a").token()
        assert token not in seen
        seen.add(token)
    epochs = [e for e, _ in arr.tracker("a").state.history] + [arr.tracker("a").state.epoch]
    assert len(set(epochs)) == len(epochs) == 11  # creation, then a write and a crash, 5 times


def test_checkpoint_waits_for_idle(tmp_path: Path) -> None:
    now = [100.0]
    b = Bare(tmp_path, monotonic=lambda: now[0])
    b.tracker.acquire("job")
    assert not b.tracker.checkpoint(0)  # already clean: nothing to do
    b.lun.write(0, b"x")
    assert b.tracker.dirty
    assert not b.persisted().clean
    now[0] += 1.0
    assert not b.tracker.checkpoint(2.0)
    assert b.tracker.dirty
    now[0] += 1.5
    assert b.tracker.checkpoint(2.0)
    assert not b.tracker.dirty
    persisted = b.persisted()
    assert persisted.clean
    assert format_token(b.lun.record.uuid, persisted.epoch, persisted.mode, persisted.value) == (
        b.tracker.token()
    )
    b.lun.write(0, b"x")  # the next change marks dirty again, durably
    assert not b.persisted().clean
    b.db.close()


def test_checkpoint_flushes_before_it_records_clean(bare: Bare) -> None:
    """Recording "clean" before the data is durable would let a power loss keep a
    token over data that never reached the disk."""
    bare.tracker.acquire("job")
    bare.lun.write(0, b"x")
    seen: list[tuple[str, bool]] = []
    bare.backend.touched = lambda what: seen.append((what, bare.persisted().clean))
    assert bare.tracker.checkpoint(0)
    assert seen == [("flush", False)]
    assert bare.persisted().clean


def test_the_dirty_mark_is_written_once_per_busy_period(bare: Bare) -> None:
    """Crash safety costs one durable write per busy period, not one per write."""
    bare.tracker.acquire("job")
    saves: list[str] = []
    bare.db.set_trace_callback(lambda sql: saves.append(sql) if "lun_state" in sql else None)
    for _ in range(50):
        bare.lun.write(0, b"x")
    assert len(saves) == 1
    bare.db.set_trace_callback(None)


# -- tampering with a backing file while the array is down (C5) -------------------------------


def _tamper_setup(arrays: Arrays) -> tuple[Path, str, os.stat_result]:
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    lun.write(0, b"original")
    _h, token = arr.tracker("a").acquire("job", granularity=64 * KiB)
    arrays.current = None
    arr.close()
    path = Path(lun.record.path)
    before = path.stat()
    time.sleep(0.05)  # beyond the file system's coarse timestamp granularity
    return path, token, before


def _after_tamper(arrays: Arrays, token: str, field_name: str) -> None:
    arr = arrays.open()
    tracker = arr.tracker("a")
    result = tracker.check(token)
    assert not result.intact
    assert "backing file changed while the array was down" in result.reason
    assert field_name in result.reason
    # The change map cannot know where: it covers everything.
    changes = tracker.hold("job").changes
    assert changes is not None
    assert changes.extents() == [ChangedExtent(0, MiB)]
    # The new stamp is recorded: no second alarm without a second change.
    new = tracker.token()
    arr = arrays.restart()
    assert arr.tracker("a").check(new).intact


def test_tampering_append_a_byte(arrays: Arrays) -> None:
    path, token, before = _tamper_setup(arrays)
    with path.open("ab") as f:
        f.write(b"!")
    assert path.stat().st_size == before.st_size + 1
    _after_tamper(arrays, token, "size")


def test_tampering_rewrite_a_byte_and_restore_mtime(arrays: Arrays) -> None:
    path, token, before = _tamper_setup(arrays)
    with path.open("r+b") as f:
        f.seek(4)
        f.write(b"X")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    # The forger covered size and mtime; only ctime gives it away.
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size,
        before.st_mtime_ns,
        before.st_ino,
    )
    assert after.st_ctime_ns != before.st_ctime_ns
    arr = arrays.open()
    result = arr.tracker("a").check(token)
    assert not result.intact
    changed = re.search(r"\((.*)\)$", result.reason)
    assert changed is not None, result.reason
    assert changed.group(1).startswith("ctime_ns ")
    assert "mtime_ns" not in result.reason
    assert "inode" not in result.reason
    arrays.current = None
    arr.close()
    _after_tamper(arrays, token, "ctime_ns")


def test_tampering_replace_the_file_by_a_copy(arrays: Arrays) -> None:
    path, token, before = _tamper_setup(arrays)
    copy = path.with_suffix(".copy")
    shutil.copy2(path, copy)
    os.replace(copy, path)
    after = path.stat()
    assert after.st_ino != before.st_ino
    assert (after.st_size, after.st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    _after_tamper(arrays, token, "inode")


def test_no_tampering_no_alarm(arrays: Arrays) -> None:
    path, token, before = _tamper_setup(arrays)
    path.read_bytes()  # reading (atime) is not a change
    assert path.stat().st_ctime_ns == before.st_ctime_ns
    arr = arrays.open()
    assert arr.tracker("a").check(token).intact


# -- change maps -------------------------------------------------------------------------------


def extents(array: Array, hold: str, lun: str = "a") -> list[tuple[int, int]]:
    changes = array.tracker(lun).hold(hold).changes
    assert changes is not None
    return [(e.offset, e.length) for e in changes.extents()]


@pytest.mark.parametrize("granularity", [4 * KiB, 64 * KiB, MiB])
def test_change_map_follows_writes(array: Array, granularity: int) -> None:
    lun = array.create_lun("big", 16 * MiB)
    tracker = array.tracker("big")
    lun.write(0, b"before the hold")  # not since the token: not in the map
    hold, _token = tracker.acquire("inc", granularity=granularity)
    assert hold.changes is not None
    assert hold.changes.granularity == granularity
    assert extents(array, "inc", "big") == []
    lun.read(0, 4096)
    lun.flush()
    lun.cache(0, 4096)
    lun.extents(0, lun.size)
    assert extents(array, "inc", "big") == []
    g = granularity
    lun.write(g * 3 + 1, b"x")
    lun.trim(g * 5, g)
    lun.zero(lun.size - 1, 1)
    assert extents(array, "inc", "big") == [(3 * g, g), (5 * g, g), (lun.size - g, g)]


def test_change_map_write_across_region_boundaries(array: Array) -> None:
    array.tracker("a").acquire("inc", granularity=4 * KiB)
    array.lun("a").write(4 * KiB - 1, b"ab")  # one byte on each side of a boundary
    array.lun("a").write(64 * KiB, b"z" * (16 * KiB))
    assert extents(array, "inc") == [(0, 8 * KiB), (64 * KiB, 16 * KiB)]


def test_holds_without_maps_and_maps_of_later_holds(array: Array) -> None:
    tracker = array.tracker("a")
    lun = array.lun("a")
    plain, _t = tracker.acquire("plain")
    assert plain.changes is None
    tracker.acquire("early", granularity=64 * KiB)
    lun.write(0, b"x")
    tracker.acquire("late", granularity=64 * KiB)
    lun.write(512 * KiB, b"y")
    assert extents(array, "early") == [(0, 64 * KiB), (512 * KiB, 64 * KiB)]
    assert extents(array, "late") == [(512 * KiB, 64 * KiB)]


def test_change_map_grow_extends_and_marks_the_tail(array: Array) -> None:
    array.tracker("a").acquire("inc", granularity=64 * KiB)
    array.grow_lun("a", 2 * MiB)
    assert extents(array, "inc") == [(MiB, MiB)]
    changes = array.tracker("a").hold("inc").changes
    assert changes is not None
    assert changes.size == 2 * MiB


def test_change_maps_survive_a_clean_restart_exactly(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("fine", granularity=4 * KiB)
    tracker.acquire("coarse", granularity=256 * KiB)
    for offset in (0, 12345, 300 * KiB, MiB - 10):
        arr.lun("a").write(offset, b"q" * 10)
    arr.grow_lun("a", 2 * MiB)
    expected = {h: extents(arr, h) for h in ("fine", "coarse")}
    tokens = {h: arr.tracker("a").hold(h).token for h in ("fine", "coarse")}
    for _ in range(2):
        arr = arrays.restart()
        assert {h: extents(arr, h) for h in ("fine", "coarse")} == expected
        assert {h: arr.tracker("a").hold(h).token for h in tokens} == tokens
    # A checkpoint records the maps too: a crash after it loses nothing.
    arr.lun("a").write(600 * KiB, b"z")
    expected = {h: extents(arr, h) for h in ("fine", "coarse")}
    assert (600 * KiB, 4 * KiB) in expected["fine"]
    arr.checkpoint(0)
    arr = arrays.crash()
    assert {h: extents(arr, h) for h in ("fine", "coarse")} == expected


def test_change_maps_after_a_crash_cover_everything(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("inc", granularity=64 * KiB)
    arr.lun("a").write(0, b"x")
    arr = arrays.crash()
    assert extents(arr, "inc") == [(0, MiB)]


def test_change_maps_after_a_crash_cover_a_grown_tail(arrays: Arrays) -> None:
    """The map recorded before the grow is smaller than the LUN after the crash:
    the regions beyond it changed too and must be covered."""
    arr = arrays.open()
    arr.create_lun("a", MiB)
    arr.tracker("a").acquire("inc", granularity=64 * KiB)
    arr.checkpoint(0)
    arr.grow_lun("a", 3 * MiB)
    arr.lun("a").write(2 * MiB, b"tail")
    arr = arrays.crash()
    assert arr.lun("a").size == 3 * MiB
    assert extents(arr, "inc") == [(0, 3 * MiB)]


def test_holds_survive_restarts_and_crashes(arrays: Arrays) -> None:
    arr = arrays.open()
    arr.create_lun("a", MiB)
    _h, token = arr.tracker("a").acquire("backup", mode="timestamp", granularity=128 * KiB)
    arr.tracker("a").acquire("host")
    arr = arrays.restart()
    assert list(arr.tracker("a").holds) == ["backup", "host"]
    assert arr.tracker("a").hold("backup").token == token
    assert arr.tracker("a").state.mode == "timestamp"
    arr = arrays.crash()
    assert list(arr.tracker("a").holds) == ["backup", "host"]
    arr.tracker("a").release("backup")
    arr = arrays.crash()
    assert list(arr.tracker("a").holds) == ["host"]
    assert arr.tracker("a").check(token).intact  # no data change at all so far
