"""The tamper watch over batches of writes (``Lun.batch``, one per NBD receive).

A batch takes the backing file's stamp once before its first change and once
at its end instead of around every write; these tests pin down what that may
and may not cost: a foreign write between batches is still seen, the array's
own writes never look foreign (whether a token is asked for in the middle of a
batch or another thread writes the LUN meanwhile), and a refused write leaves
no blind spot.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.backends.base import Backend, FileStamp
from lunseal.engine.backends.layers import Layer
from lunseal.errors import CatalogError
from tests.engine.state.test_state_trust import catalog_full
from tests.support.arrays import Arrays
from tests.support.tamper import dd

MiB = 1 << 20
FOREIGN_RE = re.compile(r"changed by another process while the array was running")


class CountingStamps(Layer):
    """Counts how often the backing file's stamp is read (an ``fstat`` each)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.stamps = 0

    def stamp(self) -> FileStamp | None:
        self.stamps += 1
        return self.inner.stamp()


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    a = Arrays(tmp_path / "data")
    yield a
    a.close()


def _foreign_epochs(arr: Array, lun: str = "a") -> list[str]:
    state = arr.tracker(lun).state
    reasons = [reason for _, reason in state.history] + [state.epoch_reason]
    return [r for r in reasons if FOREIGN_RE.search(r)]


def test_a_batch_of_writes_reads_the_stamp_once_before_and_once_after(arrays: Arrays) -> None:
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    arr.tracker("a").acquire("backup", granularity=64 << 10)
    lun.write(0, b"dirty")  # the clean -> dirty mark has its own checks
    counter = lun.push_layer(CountingStamps)
    with lun.batch():
        for i in range(32):
            lun.write(4096 * i, b"x" * 4096)
    assert counter.stamps == 2
    # Outside a batch every change still pays its own pair.
    lun.write(0, b"y" * 512)
    assert counter.stamps == 4


def test_a_foreign_write_between_batches_is_seen(arrays: Arrays) -> None:
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    with lun.batch():
        for i in range(8):
            lun.write(4096 * i, b"own" * 100)
    token = tracker.token()
    dd(Path(lun.record.path), 65536, b"tampered")
    with lun.batch():  # own writes after the foreign one must not absorb it
        for i in range(8):
            lun.write(4096 * i, b"more" * 100)
    result = tracker.check(token)
    assert not result.intact
    assert FOREIGN_RE.search(result.reason), result.reason


def test_a_token_in_the_middle_of_a_batch_never_calls_own_writes_foreign(
    arrays: Arrays,
) -> None:
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    tokens = []
    for _ in range(3):
        with lun.batch():
            lun.write(0, b"a" * 4096)
            tokens.append(tracker.token())
            lun.write(4096, b"b" * 4096)
            tokens.append(tracker.token())
            lun.write(8192, b"c" * 4096)
        tokens.append(tracker.token())
        arr.checkpoint(0)
    assert len(set(tokens)) == len(tokens)  # every write moved the state
    assert _foreign_epochs(arr) == []
    # ... and the watch still sees a real foreign write afterwards.
    dd(Path(lun.record.path), 65536, b"tampered")
    assert FOREIGN_RE.search(tracker.check(tokens[-1]).reason)


def test_another_threads_write_during_a_batch_is_stamped_by_its_end(arrays: Arrays) -> None:
    """A mirror's fan-out writes a LUN from another LUN's worker: if it lands
    while this LUN runs a batch, its stamp is left to the batch's end."""
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    tracker.acquire("backup")
    for _ in range(3):
        with lun.batch():
            lun.write(0, b"own" * 100)
            other = threading.Thread(target=lambda: lun.array_write(65536, b"fan-out"))
            other.start()
            other.join(30)
            assert not other.is_alive()
            lun.write(4096, b"own again")
        token = tracker.token()
        arr.checkpoint(0)
        assert tracker.check(token).intact
    assert _foreign_epochs(arr) == []


def test_a_refused_write_leaves_no_blind_spot_for_a_later_foreign_write(
    arrays: Arrays,
) -> None:
    """The refused change's stamp is still taken: otherwise the watch would
    treat the next foreign write as the array's own."""
    arr = arrays.open()
    lun = arr.create_lun("a", MiB)
    tracker = arr.tracker("a")
    _h, token = tracker.acquire("backup")
    with catalog_full(arr), pytest.raises(CatalogError):
        lun.write(0, b"refused")
    dd(Path(lun.record.path), 4096, b"tampered")
    result = tracker.check(token)
    assert not result.intact
    assert FOREIGN_RE.search(result.reason), result.reason
