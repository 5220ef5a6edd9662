"""The token and audit stores on a real catalog."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lunseal.engine import access
from lunseal.engine.access import Role
from lunseal.engine.catalog import Catalog
from lunseal.errors import Conflict, InvalidArgument, NotFound


def test_tokens_authenticate_by_secret_only(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    try:
        secret = cat.api_tokens.create("backup", Role.OPERATOR)
        who = cat.api_tokens.authenticate(secret)
        assert who is not None
        assert (who.name, who.role) == ("backup", Role.OPERATOR)
        prefix, token_id, _ = secret.split(".")
        for wrong in (secret + "x", f"{prefix}.{token_id}.{'A' * 43}", "", "a.b", secret.upper()):
            assert cat.api_tokens.authenticate(wrong) is None
        with pytest.raises(Conflict):
            cat.api_tokens.create("backup", Role.MONITOR)
        with pytest.raises(InvalidArgument):
            cat.api_tokens.create("admin", Role.ADMIN)  # the first-start token's name
        with pytest.raises(InvalidArgument):
            cat.api_tokens.create("../x", Role.ADMIN)
        cat.api_tokens.revoke("backup")
        assert cat.api_tokens.authenticate(secret) is None
        with pytest.raises(NotFound):
            cat.api_tokens.revoke("backup")
    finally:
        cat.close()


def test_tokens_survive_a_restart(tmp_path: Path) -> None:
    cat = Catalog(tmp_path / "c.sqlite")
    secret = cat.api_tokens.create("mon", Role.MONITOR)
    cat.close()
    cat = Catalog(tmp_path / "c.sqlite")
    try:
        who = cat.api_tokens.authenticate(secret)
        assert who is not None
        assert who.role == Role.MONITOR
        assert [t.name for t in cat.api_tokens.list()] == ["mon"]
    finally:
        cat.close()


def test_audit_is_bounded_by_rows_and_age(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(access, "AUDIT_MAX_ROWS", 10)
    cat = Catalog(tmp_path / "c.sqlite")
    try:
        for i in range(50):
            cat.audit.record("a", "POST /x", f"n={i}", "200")
        rows = cat.audit.since()
        assert [r.target for r in rows] == [f"n={i}" for i in range(40, 50)]
        # A row from before the age limit goes with the next insert.
        cat.audit._insert(time.time() - access.AUDIT_MAX_AGE - 60, "old", "x", "y", "200", "")
        assert "old" in [r.actor for r in cat.audit.since()]
        cat.audit.record("a", "POST /x", "n=new", "200")
        assert "old" not in [r.actor for r in cat.audit.since()]
        # Client text is cut, so one request cannot grow the trail without bound.
        cat.audit.record("a", "POST /x", "t" * 100_000, "400", "d" * 100_000)
        last = cat.audit.since()[-1]
        assert len(last.target) <= 500
        assert len(last.detail) <= 500
    finally:
        cat.close()
