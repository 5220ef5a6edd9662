"""nbdinfo --list shows every LUN; nbdinfo --map shows holes where a client trimmed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.interop.helpers import MiB, qemu_io, run
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

#: Deliberately uneven sizes, including one that is not a multiple of 4 KiB.
LUN_SIZES = {
    "tiny": 512,
    "odd": 5 * MiB + 512,
    "mid": 64 * MiB,
    "big": 3 << 30,
}

DATA, HOLE_ZERO = 0, 3


def _list_exports(uri: str) -> dict[str, dict[str, Any]]:
    out = run("nbdinfo", "--list", "--json", uri).stdout
    return {e["export-name"]: e for e in json.loads(out)["exports"]}


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdinfo_list_shows_every_lun_with_its_size(daemon: Daemon, tcp: bool) -> None:
    require_tools("nbdinfo")
    with daemon.client() as api:
        for name, size in LUN_SIZES.items():
            api.create_lun(name, size)
        api.create_lun("ro", 2 * MiB, read_only=True)

    exports = _list_exports(daemon.uri("", tcp=tcp))

    expected = {**LUN_SIZES, "demo": 1 << 30, "ro": 2 * MiB}
    assert {name: e["export-size"] for name, e in exports.items()} == expected
    assert exports["ro"]["is_read_only"] is True
    assert exports["mid"]["is_read_only"] is False
    assert "base:allocation" in exports["mid"]["contexts"]


def test_nbdinfo_list_follows_create_and_delete(daemon: Daemon) -> None:
    require_tools("nbdinfo")
    with daemon.client() as api:
        api.create_lun("gone", MiB)
        assert set(_list_exports(daemon.uri(""))) == {"demo", "gone"}
        api.delete_lun("gone")
    assert set(_list_exports(daemon.uri(""))) == {"demo"}


def _map(uri: str) -> list[tuple[int, int, int]]:
    """(offset, end, type) per extent of ``nbdinfo --map``, adjacent equal types merged."""
    extents = json.loads(run("nbdinfo", "--map", "--json", uri).stdout)
    merged: list[tuple[int, int, int]] = []
    for e in extents:
        start, end, kind = e["offset"], e["offset"] + e["length"], e["type"]
        if merged and merged[-1][2] == kind and merged[-1][1] == start:
            merged[-1] = (merged[-1][0], end, kind)
        else:
            merged.append((start, end, kind))
    return merged


def test_nbdinfo_map_shows_a_trimmed_range_as_hole(daemon: Daemon) -> None:
    require_tools("nbdinfo", "qemu-io")
    size = 16 * MiB
    with daemon.client() as api:
        api.create_lun("disk", size)
    uri = daemon.uri("disk")

    qemu_io(uri, "write -P 0xab 0 8M")
    assert _map(uri) == [(0, 8 * MiB, DATA), (8 * MiB, size, HOLE_ZERO)]

    qemu_io(uri, "discard 2M 1M")

    assert _map(uri) == [
        (0, 2 * MiB, DATA),
        (2 * MiB, 3 * MiB, HOLE_ZERO),
        (3 * MiB, 8 * MiB, DATA),
        (8 * MiB, size, HOLE_ZERO),
    ]
    qemu_io(uri, "read -P 0xab 0 2M", "read -P 0 2M 1M", "read -P 0xab 3M 5M")
