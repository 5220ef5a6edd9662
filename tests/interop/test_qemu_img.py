"""qemu-img convert random data into a LUN and back out, over both NBD transports."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.interop.helpers import MiB, qemu_io, random_file, run, sha256
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 64 * MiB


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_qemu_img_convert_round_trip(daemon: Daemon, tmp_path: Path, tcp: bool) -> None:
    require_tools("qemu-img", "qemu-io")
    with daemon.client() as api:
        api.create_lun("disk", SIZE)
    uri = daemon.uri("disk", tcp=tcp)
    src = random_file(tmp_path / "src.raw", SIZE)
    out = tmp_path / "out.raw"

    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out))

    assert out.stat().st_size == SIZE
    assert sha256(out) == sha256(src)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(out))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)


def test_qemu_img_compare_sees_a_changed_lun(daemon: Daemon, tmp_path: Path) -> None:
    """The comparison above can fail: one changed sector makes qemu-img compare exit 1."""
    require_tools("qemu-img", "qemu-io")
    with daemon.client() as api:
        api.create_lun("disk", 8 * MiB)
    uri = daemon.uri("disk")
    src = random_file(tmp_path / "src.raw", 8 * MiB)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri)

    qemu_io(uri, "write -P 0x5a 4096 512")

    proc = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), uri, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "4096" in proc.stdout
