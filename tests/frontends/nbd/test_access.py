"""NBD export access control over real sockets: source addresses (127.0.0.1 vs
127.0.0.2), the Unix-socket peer uid, read-only grants, revocation on change."""

from __future__ import annotations

import ipaddress
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import uvloop

from lunseal.engine.array import Array
from lunseal.engine.nbd_access import ClientSpec, parse_client
from lunseal.errors import InvalidArgument, NotFound
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.access import Peer
from lunseal.frontends.nbd.server import NbdServer
from tests.frontends.nbd.test_server import on_loop
from tests.support.nbdclient import NbdClient, OptionFailed, info_request, meta_context_request

MiB = 1 << 20
EPERM = 1


@dataclass
class Served:
    array: Array
    server: NbdServer
    tcp: tuple[str, int]
    unix: str
    loop: uvloop.Loop

    def uuid(self, name: str) -> str:
        return self.array.find(name).record.uuid  # type: ignore[union-attr]

    def allow(self, lun: str, client: str, access: str = "rw") -> None:
        self.array.catalog.nbd_access.allow(self.uuid(lun), client, access)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    array = Array.open(tmp_path / "home")
    array.create_lun("disk", 4 * MiB)
    array.create_lun("other", 2 * MiB)
    sock_dir = Path(tempfile.mkdtemp(prefix="lunseal-acl-"))
    loop = uvloop.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server = NbdServer(array)
    try:
        tcp = on_loop(loop, server.listen_tcp("127.0.0.1", 0))
        unix = on_loop(loop, server.listen_unix(sock_dir / "nbd.sock"))
        yield Served(array, server, tcp, str(unix), loop)
    finally:
        on_loop(loop, server.close())
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
        array.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def tcp_from(served: Served, source: str) -> NbdClient:
    sock = socket.create_connection(served.tcp, timeout=30, source_address=(source, 0))
    client = NbdClient(sock)
    client.handshake()
    return client


def listed(client: NbdClient) -> list[str]:
    replies = client.checked_option(c.OPT_LIST)
    names = []
    for r in replies:
        if r.type == c.REP_SERVER:
            length = int.from_bytes(r.data[:4], "big")
            names.append(r.data[4 : 4 + length].decode())
    return names


# -- TCP source ranges ---------------------------------------------------------------


def test_no_entry_leaves_every_export_open(served: Served) -> None:
    with tcp_from(served, "127.0.0.2") as client:
        assert sorted(listed(client)) == ["disk", "other"]
        assert client.go("disk").size == 4 * MiB


def test_an_address_outside_the_range_sees_neither_name_nor_size(served: Served) -> None:
    served.allow("disk", "net:127.0.0.1/32")
    with tcp_from(served, "127.0.0.1") as allowed:
        assert sorted(listed(allowed)) == ["disk", "other"]
        assert allowed.go("disk").size == 4 * MiB
        assert allowed.write(0, b"\x01" * 512) == 0
    with tcp_from(served, "127.0.0.2") as denied:
        assert listed(denied) == ["other"]
        for option in (c.OPT_INFO, c.OPT_GO):
            [reply] = denied.option(option, info_request("disk"))
            [missing] = denied.option(option, info_request("no-such-lun"))
            # Indistinguishable from a missing export (apart from the name echoed).
            assert reply.type == missing.type == c.REP_ERR_UNKNOWN
            assert reply.text == "no export named 'disk'"
        assert denied.go("other").size == 2 * MiB  # other LUNs stay open


def test_meta_contexts_of_a_denied_export_are_unknown(served: Served) -> None:
    served.allow("disk", "net:127.0.0.1")
    with tcp_from(served, "127.0.0.2") as denied:
        denied.structured_reply()
        for option in (c.OPT_LIST_META_CONTEXT, c.OPT_SET_META_CONTEXT):
            [reply] = denied.option(option, meta_context_request("disk", ("base:allocation",)))
            assert reply.type == c.REP_ERR_UNKNOWN


def test_export_name_from_a_denied_address_hangs_up(served: Served) -> None:
    served.allow("disk", "net:127.0.0.0/31")  # .0 and .1 only
    with tcp_from(served, "127.0.0.2") as denied:
        denied.send_option(c.OPT_EXPORT_NAME, b"disk")
        assert denied.drain_to_eof() == b""
    with tcp_from(served, "127.0.0.1") as allowed:
        assert allowed.export_name("disk").size == 4 * MiB


def test_read_only_grant_sets_the_flag_and_refuses_writes(served: Served) -> None:
    served.allow("disk", "net:127.0.0.2", "ro")
    served.allow("disk", "net:127.0.0.1", "rw")
    with tcp_from(served, "127.0.0.2") as ro:
        export = ro.go("disk")
        assert export.flags & c.TF_READ_ONLY
        assert ro.write(0, b"\x02" * 512) == EPERM
        ro.send_request(c.CMD_WRITE_ZEROES, 0, 512)
        assert ro.read_reply().error == EPERM
        assert ro.read(0, 512).data == bytes(512)  # nothing was written
    with tcp_from(served, "127.0.0.1") as rw:
        assert not rw.go("disk").flags & c.TF_READ_ONLY
        assert rw.write(0, b"\x03" * 512) == 0


# -- the Unix socket's peer uid --------------------------------------------------------


def test_unix_socket_peer_uid(served: Served) -> None:
    served.allow("disk", f"uid:{os.getuid() + 4242}")
    with NbdClient.connect(served.unix) as denied:
        denied.handshake()
        assert listed(denied) == ["other"]
        with pytest.raises(OptionFailed):
            denied.go("disk")
    served.allow("disk", f"uid:{os.getuid()}", "ro")
    with NbdClient.connect(served.unix) as allowed:
        allowed.handshake()
        assert sorted(listed(allowed)) == ["disk", "other"]
        assert allowed.go("disk").flags & c.TF_READ_ONLY


def test_address_ranges_do_not_match_the_unix_socket(served: Served) -> None:
    served.allow("disk", "net:0.0.0.0/0")
    served.allow("disk", "net:::/0")
    with NbdClient.connect(served.unix) as client:
        client.handshake()
        assert listed(client) == ["other"]


# -- changes end connections whose access changed ---------------------------------------


def test_an_acl_change_ends_connections_that_lost_or_changed_access(served: Served) -> None:
    one = tcp_from(served, "127.0.0.1")
    two = tcp_from(served, "127.0.0.2")
    three = tcp_from(served, "127.0.0.2")
    try:
        one.go("disk")
        two.go("disk")
        three.go("other")
        served.allow("disk", "net:127.0.0.1")  # .2 loses disk; .1 keeps rw
        assert two.drain_to_eof() == b""
        assert one.write(0, b"\x04" * 512) == 0
        assert three.read(0, 512).error == 0  # "other" is still open
        served.allow("disk", "net:127.0.0.1", "ro")  # rw -> ro: reconnect to see the flag
        assert one.drain_to_eof() == b""
    finally:
        for client in (one, two, three):
            client.close()
    with tcp_from(served, "127.0.0.1") as again:
        assert again.go("disk").flags & c.TF_READ_ONLY


# -- the store ---------------------------------------------------------------------------


def test_entries_survive_reopening_and_go_with_the_lun(tmp_path: Path) -> None:
    array = Array.open(tmp_path / "home")
    try:
        uuid = array.create_lun("disk", MiB).record.uuid
        store = array.catalog.nbd_access
        assert store.allow(uuid, "net:10.1.2.3/8", "ro")
        assert not store.allow(uuid, "net:10.0.0.0/8", "ro")  # the same entry
        store.allow(uuid, "cert:host1.example", "rw")
        store.allow(uuid, "uid:1000", "rw")
        store.remove(uuid, "uid:1000")
        with pytest.raises(NotFound):
            store.remove(uuid, "uid:1000")
        with pytest.raises(NotFound):
            store.allow("no-such-uuid", "uid:1", "rw")
    finally:
        array.close()
    array = Array.open(tmp_path / "home")
    try:
        assert {str(k): v for k, v in array.catalog.nbd_access.entries(uuid).items()} == {
            "net:10.0.0.0/8": True,
            "cert:host1.example": False,
        }
        array.delete_lun("disk")
        again = array.create_lun("disk", MiB)
        assert array.catalog.nbd_access.entries(again.record.uuid) == {}
    finally:
        array.close()
    db = sqlite3.connect(tmp_path / "home" / "catalog.sqlite")
    try:
        assert db.execute("SELECT count(*) FROM nbd_export_access").fetchone() == (0,)
    finally:
        db.close()


@pytest.mark.parametrize(
    "text",
    ["", "host", "net:300.1.1.1", "net:10.0.0.0/33", "uid:-1", "uid:x", "cert:", "ip:1.2.3.4"],
)
def test_invalid_clients_get_a_clear_error(text: str) -> None:
    with pytest.raises(InvalidArgument) as exc:
        parse_client(text)
    assert "\n" not in str(exc.value)


def test_matching_rules() -> None:
    mapped = Peer(address=ipaddress.ip_address("::ffff:127.0.0.2"))
    assert mapped.matches(ClientSpec(network=ipaddress.ip_network("127.0.0.0/24")))
    v6 = Peer(address=ipaddress.ip_address("fd00::5"))
    assert v6.matches(parse_client("net:fd00::/64"))
    assert not v6.matches(parse_client("net:0.0.0.0/0"))
    # As the TLS layer reports a verified certificate's subject CN and SANs.
    tls = Peer(
        address=ipaddress.ip_address("10.0.0.1"),
        identities=("cert:CN=host1", "san:DNS:host1.example", "san:IP:10.0.0.1"),
    )
    for name in ("host1", "CN=host1", "host1.example", "DNS:host1.example", "10.0.0.1"):
        assert tls.matches(parse_client(f"cert:{name}")), name
    for name in ("host2", "CN=host1.example", "DNS:host1", "example", "host"):
        assert not tls.matches(parse_client(f"cert:{name}")), name
    assert not Peer(address=ipaddress.ip_address("10.0.0.1")).matches(parse_client("cert:host1"))
    assert not Peer().matches(parse_client("uid:0"))


def test_ipv6_ranges_on_an_ipv6_listener(served: Served) -> None:
    host, port = on_loop(served.loop, served.server.listen_tcp("::1", 0))
    served.allow("disk", "net:fd00::/8")
    with NbdClient(socket.create_connection((host, port), timeout=30)) as denied:
        denied.handshake()
        assert listed(denied) == ["other"]
    served.allow("disk", "net:::1/128", "ro")
    with NbdClient(socket.create_connection((host, port), timeout=30)) as allowed:
        allowed.handshake()
        assert allowed.go("disk").flags & c.TF_READ_ONLY
