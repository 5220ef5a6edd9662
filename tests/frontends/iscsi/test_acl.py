"""The catalog-backed access policy: who may log in, CHAP, LUN masking, validation,
persistence across restarts, and a failing catalog leaving the ACL as it was."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.iscsi_acl import (
    Chap,
    InitiatorRecord,
    validate_iscsi_name,
    validate_secret,
)
from lunseal.errors import CatalogError, Conflict, InvalidArgument, NotFound
from lunseal.frontends.iscsi.access import ChapSecret, InitiatorAccess
from lunseal.frontends.iscsi.acl import CatalogAccess
from lunseal.frontends.scsi.interface import LunAccess
from tests.support.arrays import Arrays

HOST = "iqn.2026-12.com.example:host1"
OTHER = "iqn.2026-12.com.example:host2"
SECRET = "twelve-bytes-ok"
MUTUAL = "another-secret-16"


@pytest.fixture
def arrays(tmp_path: Path) -> Iterator[Arrays]:
    arrs = Arrays(tmp_path / "data")
    arr = arrs.open()
    arr.create_lun("a", 1 << 20, number=0)
    arr.create_lun("b", 1 << 20, number=5)
    try:
        yield arrs
    finally:
        arrs.close()


@pytest.fixture
def array(arrays: Arrays) -> Array:
    assert arrays.current is not None
    return arrays.current


def uuid(array: Array, name: str) -> str:
    return array.lun(name).record.uuid


def test_no_acl_means_anyone_sees_everything(array: Array) -> None:
    policy = CatalogAccess(array)
    assert not policy.configured
    assert policy.login("iqn.2000-01.any.host") == InitiatorAccess()


def test_once_one_initiator_is_configured_only_configured_ones_log_in(array: Array) -> None:
    store = array.catalog.iscsi_acl
    assert store.put(InitiatorRecord(HOST, 0.0))
    policy = CatalogAccess(array)
    assert policy.configured
    assert policy.login(OTHER) is None
    assert policy.login(HOST) == InitiatorAccess(luns=LunAccess(None, frozenset()))
    assert policy.login(HOST.upper()) is not None  # iSCSI names compare case-insensitively
    store.delete(HOST)
    assert policy.login(OTHER) == InitiatorAccess()  # open again


def test_masking_and_read_only_by_lun_number(array: Array) -> None:
    store = array.catalog.iscsi_acl
    store.put(InitiatorRecord(HOST, 0.0, all_luns=False, luns={uuid(array, "b"): True}))
    policy = CatalogAccess(array)
    access = policy.login(HOST)
    assert access is not None
    assert access.luns == LunAccess(frozenset({5}), frozenset({5}))
    store.set_lun(HOST, uuid(array, "a"), "rw")
    store.set_lun(HOST, uuid(array, "b"), "none")
    access = policy.login(HOST)
    assert access is not None
    assert access.luns == LunAccess(frozenset({0}), frozenset())


def test_all_luns_lists_only_read_only_ones(array: Array) -> None:
    store = array.catalog.iscsi_acl
    store.put(InitiatorRecord(HOST, 0.0))
    store.set_lun(HOST, uuid(array, "a"), "ro")
    access = CatalogAccess(array).login(HOST)
    assert access is not None
    assert access.luns == LunAccess(None, frozenset({0}))
    store.set_lun(HOST, uuid(array, "a"), "rw")
    assert store.require(HOST).luns == {}
    with pytest.raises(Conflict, match="sees every LUN"):
        store.set_lun(HOST, uuid(array, "a"), "none")


def test_chap_one_way_and_mutual(array: Array) -> None:
    store = array.catalog.iscsi_acl
    store.put(InitiatorRecord(HOST, 0.0, chap=Chap("host", SECRET), mutual=Chap("tgt", MUTUAL)))
    access = CatalogAccess(array).login(HOST)
    assert access is not None
    assert access.chap == ChapSecret("host", SECRET)
    assert access.mutual == ChapSecret("tgt", MUTUAL)
    store.set_chap(HOST, None, None)
    access = CatalogAccess(array).login(HOST)
    assert access is not None
    assert access.chap is None
    assert access.mutual is None


@pytest.mark.parametrize(
    ("chap", "mutual", "match"),
    [
        (Chap("host", "short"), None, "at least 12"),
        (Chap("host", "x" * 256), None, "at most 255"),
        (Chap("", SECRET), None, "CHAP user name"),
        (None, Chap("tgt", MUTUAL), "needs one-way CHAP"),
        (Chap("host", SECRET), Chap("tgt", SECRET), "must differ"),
        (Chap("host", SECRET), Chap("tgt", "short"), "mutual CHAP secret is 5 bytes"),
    ],
)
def test_bad_chap_is_refused_and_nothing_is_stored(
    array: Array, chap: Chap | None, mutual: Chap | None, match: str
) -> None:
    store = array.catalog.iscsi_acl
    with pytest.raises(InvalidArgument, match=match):
        store.put(InitiatorRecord(HOST, 0.0, chap=chap, mutual=mutual))
    assert not store.configured


@pytest.mark.parametrize(
    "name",
    [
        "iqn.2026-12.com.example",
        "iqn.2026-12.com.example:host-1.a_b:c",
        "IQN.2026-12.COM.Example:Host",
        "eui.0123456789ABCDEF",
        "naa.52004567ba64678d",
        "naa.60014051e4f1b4e2a2b4a0b2c3d4e5f6",
    ],
)
def test_valid_names(name: str) -> None:
    assert validate_iscsi_name(name) == name.lower()


@pytest.mark.parametrize(
    "name",
    [
        "",
        "host1",
        "iqn.26-12.com.example",
        "iqn.2026-13.com.example",
        "iqn.2026-12.",
        "iqn.2026-12.com..example",
        "iqn.2026-12.com.example:bad name",
        "iqn.2026-12.com.example:a/b",
        "eui.0123",
        "naa.0123456789abcdef0",
        "iqn.2026-12.com.example:" + "x" * 200,
    ],
)
def test_invalid_names_are_refused(name: str) -> None:
    with pytest.raises(InvalidArgument, match="invalid iSCSI name"):
        validate_iscsi_name(name)


def test_secret_minimum_is_twelve_bytes() -> None:
    assert validate_secret("x" * 12) == "x" * 12
    with pytest.raises(InvalidArgument):
        validate_secret("x" * 11)


def test_acl_survives_a_restart_and_a_deleted_lun_leaves_it(arrays: Arrays) -> None:
    array = arrays.current
    assert array is not None
    luns = {uuid(array, "a"): False, uuid(array, "b"): True}
    array.catalog.iscsi_acl.put(
        InitiatorRecord(HOST, 0.0, all_luns=False, luns=luns, chap=Chap("h", SECRET))
    )
    array.delete_lun("a")
    array = arrays.restart()
    rec = array.catalog.iscsi_acl.require(HOST)
    assert rec.luns == {uuid(array, "b"): True}
    assert rec.chap == Chap("h", SECRET)
    array.create_lun("a", 1 << 20, number=0)  # a new LUN under the old name: not inherited
    access = CatalogAccess(array).login(HOST)
    assert access is not None
    assert access.luns.visible == frozenset({5})
    array.catalog.iscsi_acl.set_lun(HOST, uuid(array, "a"), "ro")  # the stale UUID is gone


def test_unknown_initiator_errors(array: Array) -> None:
    store = array.catalog.iscsi_acl
    with pytest.raises(NotFound):
        store.delete(HOST)
    with pytest.raises(NotFound):
        store.set_lun(HOST, uuid(array, "a"), "ro")
    store.put(InitiatorRecord(HOST, 0.0))
    with pytest.raises(InvalidArgument, match="ro, rw or none"):
        store.set_lun(HOST, uuid(array, "a"), "rx")


def test_a_failing_catalog_changes_nothing(array: Array) -> None:
    store = array.catalog.iscsi_acl
    store.put(InitiatorRecord(HOST, 0.0))
    db = array.catalog._db
    db.execute("PRAGMA query_only = ON")  # the catalog refuses every write, as a full disk would
    try:
        with pytest.raises(CatalogError):
            store.put(InitiatorRecord(OTHER, 0.0))
        with pytest.raises(CatalogError):
            store.set_chap(HOST, Chap("h", SECRET), None)
    finally:
        db.execute("PRAGMA query_only = OFF")
    assert store.get(OTHER) is None
    assert store.require(HOST).chap is None


def test_the_catalog_holding_secrets_is_owner_only(tmp_path: Path) -> None:
    data = tmp_path / "data"
    arrs = Arrays(data)
    array = arrs.open()
    array.catalog.iscsi_acl.put(InitiatorRecord(HOST, 0.0, chap=Chap("h", SECRET)))
    files = [data / name for name in ("catalog.sqlite", "catalog.sqlite-wal", "catalog.sqlite-shm")]
    assert [oct(f.stat().st_mode & 0o777) for f in files] == ["0o600"] * 3
    arrs.close()
    for f in files:
        if f.exists():
            f.chmod(0o644)  # a catalog from before: fixed when it is opened
    arrs.open()
    try:
        left = [f for f in files if f.exists()]
        assert [oct(f.stat().st_mode & 0o777) for f in left] == ["0o600"] * len(left)
    finally:
        arrs.close()
