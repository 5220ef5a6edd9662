"""``lunseal nbd ...`` against a real daemon, checked with real NBD clients:
nbdinfo --list shows only allowed exports, qemu-io cannot write through a
read-only grant, and a change ends the connections it concerns."""

from __future__ import annotations

import json
import os

import pytest

from tests.interop.helpers import qemu_io, run
from tests.support.daemon import Daemon
from tests.support.nbdclient import NbdClient
from tests.support.tools import require_tools

pytestmark = [pytest.mark.daemon, pytest.mark.interop]
MiB = 1 << 20


def listed(uri: str) -> set[str]:
    proc = run("nbdinfo", "--list", "--json", uri)
    return {e["export-name"] for e in json.loads(proc.stdout)["exports"]}


def test_allow_show_deny(cli_daemon: Daemon) -> None:
    require_tools("nbdinfo", "qemu-io")
    with cli_daemon.client() as api:
        api.create_lun("acl-a", 4 * MiB)
        api.create_lun("acl-b", 4 * MiB)
    unix_list = f"nbd+unix://?socket={cli_daemon.socket}"
    tcp_list = f"nbd://{cli_daemon.tcp}"
    assert {"acl-a", "acl-b"} <= listed(unix_list)

    # Someone else's uid and another source address: this client is outside the list.
    other = cli_daemon.cli("nbd", "allow", "acl-a", f"uid:{os.getuid() + 4242}", "net:127.0.0.2")
    assert other.returncode == 0, other.stderr
    assert "only these NBD clients" in other.stdout
    assert "acl-a" not in listed(unix_list)
    assert "acl-a" not in listed(tcp_list)
    assert "acl-b" in listed(unix_list)
    refused = qemu_io(cli_daemon.uri("acl-a"), "read 0 4k", check=False)
    assert refused.returncode != 0
    assert "read " not in refused.stdout

    # Our own uid, read-only: listed, readable, and qemu-io's write is refused.
    mine = cli_daemon.cli("nbd", "allow", "acl-a", f"uid:{os.getuid()}", "--ro")
    assert mine.returncode == 0, mine.stderr
    assert "acl-a" in listed(unix_list)
    assert "acl-a" not in listed(tcp_list)  # 127.0.0.1 is still outside
    qemu_io(cli_daemon.uri("acl-a"), "read -P 0 0 4k", read_only=True)
    write = qemu_io(cli_daemon.uri("acl-a"), "write -P 0x5a 0 4k", check=False)
    assert write.returncode != 0
    assert "wrote" not in write.stdout
    assert "Permission denied" in write.stderr  # offered read-only
    qemu_io(cli_daemon.uri("acl-a"), "read -P 0 0 4k", read_only=True)  # nothing was written
    with cli_daemon.client() as api:
        assert api.show_lun("acl-a").stats.bytes_written == 0

    shown = cli_daemon.cli("--json", "nbd", "show", "acl-a")
    assert json.loads(shown.stdout) == {
        "lun": "acl-a",
        "open": False,
        "entries": [
            {"client": "net:127.0.0.2/32", "access": "rw"},
            {"client": f"uid:{os.getuid()}", "access": "ro"},
            {"client": f"uid:{os.getuid() + 4242}", "access": "rw"},
        ],
    }

    opened = cli_daemon.cli("nbd", "deny", "acl-a", "--all")
    assert opened.returncode == 0, opened.stderr
    assert "any client may open it" in opened.stdout
    qemu_io(cli_daemon.uri("acl-a"), "write -P 0x5a 0 4k")
    assert "acl-a" in listed(tcp_list)


def test_a_change_ends_the_connections_it_concerns(cli_daemon: Daemon) -> None:
    with cli_daemon.client() as api:
        api.create_lun("acl-c", MiB)
    with NbdClient.connect(cli_daemon.socket) as attached:
        attached.handshake()
        attached.go("acl-c")
        assert attached.write(0, b"\x01" * 512) == 0
        proc = cli_daemon.cli("nbd", "allow", "acl-c", f"uid:{os.getuid()}", "--ro")
        assert proc.returncode == 0, proc.stderr
        assert attached.drain_to_eof() == b""  # rw -> ro: it must reconnect
    assert "its NBD access to LUN acl-c changed to ro" in cli_daemon.log()


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["allow", "acl-d", "host1"], 2, "invalid NBD client 'host1'"),
        (["allow", "acl-d", "net:10.0.0.300/8"], 2, "invalid address range"),
        (["allow", "no-such-lun", "uid:0"], 3, "no-such-lun"),
        (["deny", "acl-d", "uid:7"], 3, "no NBD access entry uid:7"),
    ],
)
def test_bad_input_gets_one_line(
    cli_daemon: Daemon, args: list[str], code: int, message: str
) -> None:
    with cli_daemon.client() as api:
        if not any(lun.name == "acl-d" for lun in api.list_luns()):
            api.create_lun("acl-d", MiB)
    proc = cli_daemon.cli("nbd", *args)
    assert proc.returncode == code, proc.stderr
    assert message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
