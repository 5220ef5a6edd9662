"""SIGTERM with clients connected: exit 0, and what was written is there after restart."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.helpers import MiB, QemuIoSession, qemu_io, run, wait_until
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

SIZE = 16 * MiB


@pytest.fixture
def home_daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A daemon without the demo LUN; the test restarts it in the same home."""
    d = Daemon(tmp_path / "home", extra_args=["--no-demo"]).start()
    try:
        yield d
    finally:
        d.kill()


def _connections(daemon: Daemon, name: str) -> int:
    with daemon.client() as api:
        return api.show_lun(name).connections


def _assert_clean_log(daemon: Daemon) -> None:
    log = daemon.log()
    assert "Traceback" not in log, log
    assert "array closed cleanly" in log, log


def test_sigterm_with_an_idle_client_connected(home_daemon: Daemon, tmp_path: Path) -> None:
    require_tools("qemu-io", "nbdcopy")
    d = home_daemon
    with d.client() as api:
        api.create_lun("disk", SIZE)
    with QemuIoSession(d.uri("disk")) as session:
        assert "wrote" in session.command("write -P 0x5a 0 4M")
        assert "wrote" in session.command("write -P 0xa5 12M 1M")
        wait_until(lambda: _connections(d, "disk") == 1, what="the connection to show up")

        assert d.stop(timeout=30) == 0

        # The server closed the connection: the client's next request fails.
        assert "read failed" in session.command("read -P 0x5a 0 4k")
    _assert_clean_log(d)
    assert not Path(d.socket).exists()

    d.start()
    with d.client() as api:
        assert api.status().last_shutdown_clean
    expected = b"\x5a" * (4 * MiB) + bytes(8 * MiB) + b"\xa5" * MiB + bytes(3 * MiB)
    out = tmp_path / "after.raw"
    run("nbdcopy", d.uri("disk"), str(out))
    assert out.read_bytes() == expected


def test_sigterm_during_writes_exits_cleanly(home_daemon: Daemon, tmp_path: Path) -> None:
    """Clients in the middle of a write stream are cut off; the array still shuts down clean."""
    require_tools("fio", "qemu-io")
    d = home_daemon
    with d.client() as api:
        api.create_lun("busy", SIZE)
    fio = subprocess.Popen(
        [
            "fio",
            "--name=busy",
            "--ioengine=nbd",
            f"--uri={d.uri('busy')}",
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=32",
            "--numjobs=2",
            f"--size={SIZE}",
            "--time_based",
            "--runtime=60",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_until(lambda: _written(d, "busy") > 8 * MiB, what="fio to be writing")
        assert d.stop(timeout=30) == 0
        assert fio.wait(30) != 0  # fio saw its connection go away mid-run
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    _assert_clean_log(d)

    d.start()
    with d.client() as api:
        assert api.status().last_shutdown_clean
    qemu_io(d.uri("busy"), "read 0 16M")


def _written(daemon: Daemon, name: str) -> int:
    with daemon.client() as api:
        return api.show_lun(name).stats.bytes_written
