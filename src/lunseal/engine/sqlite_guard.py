"""SQLite errors become :class:`~lunseal.errors.CatalogError` at the catalog's edge,
so front ends answer them like any other lunseal error (API 503, NBD EIO).

The catalog is one connection shared by every thread.  A statement run by one
thread while another has a transaction open would join that transaction and
vanish with its rollback, after its caller was told it was durable.  So every
guarded call and every transaction holds the connection's lock throughout.
"""

from __future__ import annotations

import contextlib
import functools
import sqlite3
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, ParamSpec, Self, TypeVar

from lunseal.errors import CatalogError

P = ParamSpec("P")
R = TypeVar("R")


def catalog_error(exc: sqlite3.Error) -> CatalogError:
    return CatalogError(f"catalog failure: {exc} (the operation was not done; retry later)")


class LockedConnection(sqlite3.Connection):
    """A connection several threads may use (``sqlite3.connect(...,
    factory=LockedConnection)``): each statement, each ``with`` block and each
    guarded call or transaction runs under one re-entrant lock, so one LUN
    worker's commit never lands inside another thread's transaction."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lock = threading.RLock()

    def execute(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().execute(*args, **kwargs)

    def executemany(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().executemany(*args, **kwargs)

    def executescript(self, *args: Any, **kwargs: Any) -> sqlite3.Cursor:
        with self.lock:
            return super().executescript(*args, **kwargs)

    def __enter__(self) -> Self:
        self.lock.acquire()
        try:
            return super().__enter__()
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, *exc: Any) -> Literal[False]:
        try:
            return super().__exit__(*exc)
        finally:
            self.lock.release()


#: For connections opened without the factory (tests' bare stores): one lock for all.
_FALLBACK = threading.RLock()


def connection_lock(db: sqlite3.Connection) -> threading.RLock:
    """The lock serialising ``db``'s users (re-entrant: composite updates nest)."""
    return db.lock if isinstance(db, LockedConnection) else _FALLBACK


def guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Run a method of an object with a ``_db`` connection under the connection's
    lock; turn a :class:`sqlite3.Error` it raises into a :class:`CatalogError`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        db: sqlite3.Connection = getattr(args[0], "_db")  # noqa: B009 -- P.args is opaque
        with connection_lock(db):
            try:
                return method(*args, **kwargs)
            except sqlite3.IntegrityError:
                raise  # a broken invariant of the caller, not a failing catalog
            except sqlite3.Error as exc:
                raise catalog_error(exc) from exc

    return wrapper


@contextlib.contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """Run the block as one write transaction: all of it is durable, or none.

    Inside another transaction the block joins it, so composite updates nest.
    The connection must be in autocommit mode (``isolation_level=None``).
    """
    with connection_lock(db):
        if db.in_transaction:  # this thread's own outer transaction: the lock says so
            yield
            return
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            # SQLite rolls back by itself after some errors (disk full, I/O error).
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise
