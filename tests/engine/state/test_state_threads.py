"""A tracker reached from two threads (a mirror source's worker writes into the
target LUN while the target's own worker answers token calls) keeps each call
whole: a second thread waits until the first has committed."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from lunseal.engine.array import Array
from lunseal.engine.state.tracker import LunState, StateStore


class StalledStore:
    """Passes through to the real store; the first state save (alone, or with a
    hold's removal in one transaction) waits once on ``release``."""

    def __init__(self, inner: StateStore) -> None:
        self.inner = inner
        self.entered, self.release = threading.Event(), threading.Event()

    def _stall(self) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(60)

    def save_state(self, state: LunState) -> None:
        self._stall()
        self.inner.save_state(state)

    def delete_hold(self, lun_uuid: str, name: str, state: LunState | None = None) -> None:
        self._stall()
        self.inner.delete_hold(lun_uuid, name, state)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_a_write_waits_for_another_threads_tracker_call(tmp_path: Path) -> None:
    array = Array.open(tmp_path / "home")
    try:
        lun = array.create_lun("t", 1 << 20)
        tracker = array.tracker("t")
        tracker.acquire("h")
        lun.write(0, b"x")  # dirty now, so the next write only advances the counter
        token = tracker.token()
        store = StalledStore(tracker.store)
        tracker.store = store
        first = threading.Thread(target=lambda: tracker.release("h"))
        first.start()
        assert store.entered.wait(30)
        # Another thread's write while the release is half done: it must not
        # interleave with it (the hold would be counted on, then vanish).
        wrote = threading.Event()

        def write() -> None:
            lun.write(512, b"y")
            wrote.set()

        second = threading.Thread(target=write)
        second.start()
        assert not wrote.wait(0.5), "the write ran inside another thread's tracker call"
        store.release.set()
        first.join(30)
        second.join(30)
        assert wrote.is_set()
        assert tracker.check(token).intact is False
    finally:
        array.close()
