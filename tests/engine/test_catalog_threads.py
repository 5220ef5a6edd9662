"""One catalog connection shared by the event loop and every LUN's worker: a
transaction on one thread is never joined by another thread's statement."""

from __future__ import annotations

import threading
from pathlib import Path

from lunseal.engine.catalog import Catalog


def test_a_statement_waits_for_another_threads_transaction(tmp_path: Path) -> None:
    catalog = Catalog(tmp_path / "catalog.sqlite")
    db = catalog._db
    inside, release, wrote = threading.Event(), threading.Event(), threading.Event()

    def transaction() -> None:
        with db:
            db.execute("BEGIN")
            db.execute("INSERT INTO meta (key, value) VALUES ('a', '1')")
            inside.set()
            assert release.wait(30)
            db.execute("ROLLBACK")  # this thread's work is undone, and only its own

    def other_thread() -> None:
        catalog.set_meta("b", "2")
        wrote.set()

    first = threading.Thread(target=transaction)
    first.start()
    try:
        assert inside.wait(30)
        second = threading.Thread(target=other_thread)
        second.start()
        assert not wrote.wait(0.5), "a statement ran inside another thread's transaction"
    finally:
        release.set()
    first.join(30)
    second.join(30)
    assert wrote.is_set()
    assert catalog.get_meta("a") is None
    assert catalog.get_meta("b") == "2"  # not rolled back with the other thread's work
    catalog.close()
