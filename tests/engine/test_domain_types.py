"""Tracking modes and mirror states are enums in the engine and the API schema, yet the
catalog and the wire keep the same plain strings they always held."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.mirror.mirror import MirrorState, TargetAccess
from lunseal.engine.state.tracker import TrackingMode, validate_mode
from lunseal.errors import InvalidArgument
from lunseal.schema.mirrors import MirrorSplit
from lunseal.schema.state import HoldAcquire
from tests.support.arrays import Arrays

MiB = 1 << 20


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    arrs = Arrays(tmp_path / "data")
    yield arrs
    arrs.close()


def raw(array: Array, sql: str) -> list[tuple[object, ...]]:
    db = sqlite3.connect(array.catalog.path)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_the_mode_is_an_enum_in_memory_and_the_same_string_on_disk(arrays: Arrays) -> None:
    array = arrays.open()
    array.create_lun("a", MiB)
    array.tracker("a").acquire("h", mode="flag")
    assert raw(array, "SELECT mode FROM lun_state") == [("flag",)]
    array = arrays.restart()
    mode = array.tracker("a").state.mode
    assert mode is TrackingMode.FLAG
    assert ".flag." in array.tracker("a").token()


def test_mirror_states_and_access_load_as_enums_from_the_same_strings(arrays: Arrays) -> None:
    array = arrays.open()
    source, target = array.create_lun("s", MiB), array.create_lun("t", MiB)
    array.mirrors.create(source, target)
    assert raw(array, "SELECT state, target_access FROM mirrors") == [("syncing", "ro")]
    array = arrays.restart()
    [rec] = array.catalog.mirrors.mirrors()
    assert rec.state is MirrorState.SYNCING
    assert rec.target_access is TargetAccess.RO


def test_a_bad_mode_is_one_clear_error_and_a_good_one_becomes_the_enum() -> None:
    assert validate_mode("timestamp") is TrackingMode.TIMESTAMP
    with pytest.raises(InvalidArgument, match="use counter, timestamp, flag"):
        validate_mode("Counter")


def test_the_api_bodies_carry_the_enums_as_their_plain_strings() -> None:
    body = HoldAcquire.model_validate({"mode": "timestamp"})
    assert body.mode is TrackingMode.TIMESTAMP
    assert json.loads(body.model_dump_json())["mode"] == "timestamp"
    split = MirrorSplit.model_validate({"target_access": "rw"})
    assert split.target_access is TargetAccess.RW
    assert json.loads(split.model_dump_json()) == {"target_access": "rw"}
