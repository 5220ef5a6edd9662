"""Who is on the other end of an NBD connection, and what the export ACL
(:mod:`lunseal.engine.nbd_access`) lets them do with a LUN.

The answer is asked at every option that names an export, and kept with a
connection in transmission: after an ACL change the server asks again for
every such connection and ends those whose answer differs
(``NbdServer.access_changed``), as the iSCSI target does for sessions.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from lunseal.engine.lun import Lun
from lunseal.engine.nbd_access import ClientSpec, NbdAccessStore

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_UCRED = struct.Struct("3i")  # pid, uid, gid


class Access(enum.Enum):
    NONE = "none"
    READ_ONLY = "ro"
    READ_WRITE = "rw"


@dataclass(frozen=True)
class Peer:
    """What an ACL entry can match: the TCP source address, the Unix-socket
    peer uid, and the TLS certificate identities (subject CN, SANs)."""

    address: IpAddress | None = None
    uid: int | None = None
    identities: tuple[str, ...] = ()

    def matches(self, spec: ClientSpec) -> bool:
        if spec.cert is not None:
            return any(spec.cert in _names(identity) for identity in self.identities)
        if spec.network is not None:
            return self.address is not None and _in(self.address, spec.network)
        return self.uid is not None and self.uid == spec.uid


def _names(identity: str) -> tuple[str, ...]:
    """The names a ``cert:`` entry may use for one TLS identity.

    The TLS layer reports ``cert:CN=host1`` for the subject CN and
    ``san:DNS:host1.example`` (``IP``, ``URI``, ``email``) for alternative
    names: an entry may give the bare value (``cert:host1``) or the typed form
    (``cert:CN=host1``, ``cert:DNS:host1.example``)."""
    kind, _, rest = identity.partition(":")
    if kind == "cert" and rest.startswith("CN="):
        return identity, rest, rest[3:]
    if kind == "san" and ":" in rest:
        return identity, rest, rest.partition(":")[2]
    return (identity,)


def _in(address: IpAddress, network: ipaddress.IPv4Network | ipaddress.IPv6Network) -> bool:
    # An IPv4 client on a dual-stack listener shows as ::ffff:a.b.c.d: an IPv4
    # range must still cover it.
    if isinstance(address, ipaddress.IPv6Address) and isinstance(network, ipaddress.IPv4Network):
        return address.ipv4_mapped is not None and address.ipv4_mapped in network
    return address.version == network.version and address in network


def peer_of(sock: socket.socket | None, peername: object, identities: Sequence[str]) -> Peer:
    """The peer of an accepted socket (TCP: its source address; Unix: SO_PEERCRED)."""
    ids = tuple(identities)
    if sock is not None and sock.family == socket.AF_UNIX:
        try:
            _pid, uid, _gid = _UCRED.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            )
        except OSError:
            return Peer(identities=ids)  # unknown uid: matches no uid entry
        return Peer(uid=uid, identities=ids)
    if isinstance(peername, tuple) and peername:
        try:
            address = ipaddress.ip_address(str(peername[0]).split("%", 1)[0])
        except ValueError:
            return Peer(identities=ids)
        return Peer(address=address, identities=ids)
    return Peer(identities=ids)


def access_for(store: NbdAccessStore, lun: Lun, peer: Peer) -> Access:
    """Read-write if any matching entry grants it, read-only if only read-only
    ones match; no entry at all leaves the LUN open to everyone."""
    entries = store.entries(lun.record.uuid)
    if not entries:
        return Access.READ_WRITE
    matching = [read_only for spec, read_only in entries.items() if peer.matches(spec)]
    if not matching:
        return Access.NONE
    return Access.READ_ONLY if all(matching) else Access.READ_WRITE
