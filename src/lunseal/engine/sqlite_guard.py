"""SQLite errors become :class:`~lunseal.errors.CatalogError` at the catalog's edge,
so front ends answer them like any other lunseal error (API 503, NBD EIO)."""

from __future__ import annotations

import contextlib
import functools
import sqlite3
from collections.abc import Callable, Iterator
from typing import ParamSpec, TypeVar

from lunseal.errors import CatalogError

P = ParamSpec("P")
R = TypeVar("R")


def catalog_error(exc: sqlite3.Error) -> CatalogError:
    return CatalogError(f"catalog failure: {exc} (the operation was not done; retry later)")


def guarded(method: Callable[P, R]) -> Callable[P, R]:
    """Turn a :class:`sqlite3.Error` raised by ``method`` into a :class:`CatalogError`."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
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
    if db.in_transaction:
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
