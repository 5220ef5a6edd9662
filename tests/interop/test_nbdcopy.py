"""nbdcopy file -> LUN and LUN -> file, dense and sparse, with multi-conn."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.interop.helpers import MiB, qemu_io, random_file, run, sha256
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 32 * MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_nbdcopy_file_to_lun_and_back(daemon: Daemon, tmp_path: Path, tcp: bool) -> None:
    require_tools("nbdcopy")
    with daemon.client() as api:
        api.create_lun("disk", SIZE)
    uri = daemon.uri("disk", tcp=tcp)
    src = random_file(tmp_path / "src.raw", SIZE)
    out = tmp_path / "out.raw"

    run("nbdcopy", "--flush", str(src), uri)
    run("nbdcopy", uri, str(out))

    assert out.stat().st_size == SIZE
    assert sha256(out) == sha256(src)


def _sparse_source(path: Path) -> Path:
    """Random data in a few 1 MiB islands, holes (reading as zeroes) in between."""
    with path.open("wb") as f:
        f.truncate(SIZE)
        for mib in (0, 5, 6, 17, 31):
            f.seek(mib * MiB)
            f.write(os.urandom(MiB))
    return path


def test_nbdcopy_zeroes_the_holes_of_a_sparse_source(daemon: Daemon, tmp_path: Path) -> None:
    """nbdcopy writes holes as WRITE_ZEROES: old LUN contents there must become zeroes."""
    require_tools("nbdcopy", "qemu-io")
    with daemon.client() as api:
        api.create_lun("disk", SIZE)
    uri = daemon.uri("disk")
    qemu_io(uri, "write -P 0xff 0 32M")
    src = _sparse_source(tmp_path / "sparse.raw")
    out = tmp_path / "out.raw"

    run("nbdcopy", str(src), uri)
    run("nbdcopy", uri, str(out))

    assert sha256(out) == sha256(src)
    qemu_io(uri, "read -P 0 1M 4M", "read -P 0 18M 13M")
    with daemon.client() as api:
        assert api.show_lun("disk").stats.zeroes > 0
