"""A read-only LUN refuses writes from qemu-io, whether or not the client knows it."""

from __future__ import annotations

import pytest

from tests.interop.helpers import MiB, QemuIoSession, qemu_io
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]


def _bytes_written(daemon: Daemon, name: str) -> int:
    with daemon.client() as api:
        return api.show_lun(name).stats.bytes_written


def test_read_only_lun_refuses_writes_from_qemu_io(daemon: Daemon) -> None:
    require_tools("qemu-io")
    with daemon.client() as api:
        api.create_lun("ro", 4 * MiB)
    uri = daemon.uri("ro")
    qemu_io(uri, "write -P 0x11 0 4M")
    with daemon.client() as api:
        assert api.update_lun("ro", read_only=True).read_only

    opened_rw = qemu_io(uri, "write -P 0x22 0 4k", check=False)
    assert opened_rw.returncode != 0
    assert "wrote" not in opened_rw.stdout
    assert "Permission denied" in opened_rw.stderr

    opened_ro = qemu_io(uri, "write -P 0x22 0 4k", check=False, read_only=True)
    assert opened_ro.returncode != 0
    assert "wrote" not in opened_ro.stdout

    qemu_io(uri, "read -P 0x11 0 4M", read_only=True)
    assert _bytes_written(daemon, "ro") == 4 * MiB  # only the write made while writable


def test_server_refuses_writes_on_a_connection_opened_before_read_only(daemon: Daemon) -> None:
    """The client negotiated a writable export; the server itself must answer EPERM."""
    require_tools("qemu-io")
    with daemon.client() as api:
        api.create_lun("flip", 4 * MiB)
    uri = daemon.uri("flip")
    with QemuIoSession(uri) as session:
        assert "wrote" in session.command("write -P 0x11 0 1M")
        with daemon.client() as api:
            api.update_lun("flip", read_only=True)

        refused = {cmd: session.command(cmd) for cmd in _WRITES}

        assert "Pattern verification failed" not in session.command("read -P 0x11 0 1M")
        assert "Pattern verification failed" not in session.command("read -P 0 1M 3M")
    for cmd, output in refused.items():
        assert "Operation not permitted" in output, (cmd, output)
    assert _bytes_written(daemon, "flip") == 1 * MiB


_WRITES = ("write -P 0x22 0 64k", "write -z 0 64k", "discard 0 64k")
