"""The asyncio shell around the NBD codec: sockets, backpressure, shutdown.

Each connection is an ``asyncio.BufferedProtocol``: the kernel copies request
bytes straight into the codec's buffer and WRITE payloads go from there to
``pwrite`` without another copy.  Requests are served inline on the event
loop (see :mod:`lunseal.engine.file_backend`), and all replies produced by one
receive are sent with a single ``writelines``.

Backpressure: past ``WRITE_HIGH_WATER`` bytes of unsent replies the
transport asks us to pause and we stop reading; complete requests already
buffered wait until the client drains its replies.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from pathlib import Path
from typing import cast

from lunseal.engine.array import Array
from lunseal.engine.backend import FileSlice
from lunseal.engine.lun import Lun
from lunseal.errors import ProtocolError
from lunseal.nbd import constants as c
from lunseal.nbd.codec import ClientFlags, OptionRequest, Request, ServerCodec
from lunseal.nbd.negotiation import Negotiator
from lunseal.nbd.transmission import Buffers, Transmission

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20
SOCKET_BUFFER = 4 << 20
#: Read replies at least this long are sent with sendfile instead of pread+write.
ZERO_COPY_MIN = 64 << 10


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.codec = ServerCodec()
        self.negotiator = Negotiator(resolve=server.resolve, list_exports=server.array.luns)
        self.transmission: Transmission | None = None
        self.lun: Lun | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._out: Buffers = []
        self._write_paused = False
        self._closing = False
        self._sock_fd = -1
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        _enlarge_socket_buffers(transport)
        sock = transport.get_extra_info("socket")
        self._sock_fd = sock.fileno() if sock is not None else -1
        self.peer = _peer_name(transport.get_extra_info("peername"), sock)
        self.server.connections.add(self)
        self.transport.write(self.codec.greeting())
        log.debug("NBD connection from %s", self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.codec.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        self.codec.buffer_updated(nbytes)
        self._process()

    def eof_received(self) -> bool:
        return False  # close our side too

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self.server.connections.discard(self)
        if self.lun is not None:
            self.lun.users.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("NBD connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self._closing:
            self.transport.resume_reading()
            self._process()  # complete requests may be waiting in the buffer

    # -- processing -------------------------------------------------------------

    def _process(self) -> None:
        out = self._out
        try:
            while not self._write_paused and not self._closing:
                event = self.codec.next_event()
                if event is None:
                    break
                if isinstance(event, Request):
                    self._request(event, out)
                else:
                    self._negotiate(event, out)
                # Send early so queued replies stay bounded by the high water mark.
                if len(out) > 64:
                    self._send(out)
            self._send(out)
        except ProtocolError as exc:
            log.warning("NBD client %s: %s; closing the connection", self.peer, exc.message)
            self.close()
        except OSError as exc:
            # A reply whose header is out cannot be turned into an error any more.
            log.error("NBD client %s: sending a reply failed: %s; dropping", self.peer, exc)
            out.clear()
            if self.transport is not None:
                self.transport.abort()

    def _send(self, out: Buffers) -> None:
        """Send queued reply pieces in order; large file slices go zero-copy."""
        transport = self.transport
        if not out or transport is None:
            out.clear()
            return
        batch: list[bytes | memoryview] = []
        for piece in out:
            if not isinstance(piece, FileSlice):
                batch.append(piece)
            elif piece.length < ZERO_COPY_MIN:
                batch.append(_pread_full(piece, 0))
            else:
                transport.writelines(batch)
                batch = []
                self._send_file(transport, piece)
        transport.writelines(batch)
        out.clear()

    def _send_file(self, transport: asyncio.Transport, piece: FileSlice) -> None:
        # sendfile writes to the socket behind the transport's back, which keeps
        # the byte order only while the transport has nothing queued.
        sent = 0
        if self._sock_fd >= 0 and transport.get_write_buffer_size() == 0:
            sent = _sendfile_some(self._sock_fd, piece)
        if sent < piece.length:
            transport.write(_pread_full(piece, sent))

    def _request(self, req: Request, out: Buffers) -> None:
        if req.type == c.CMD_DISC:
            self.close()
            return
        assert self.transmission is not None
        self.transmission.handle(req, out)

    def _negotiate(self, event: ClientFlags | OptionRequest, out: Buffers) -> None:
        if isinstance(event, ClientFlags):
            self.negotiator.no_zeroes = event.no_zeroes
            return
        outcome = self.negotiator.handle(event.option, event.data)
        out.extend(outcome.replies)
        if outcome.close:
            self.close()
        elif outcome.lun is not None:
            self._start_transmission(outcome.lun)

    def _start_transmission(self, lun: Lun) -> None:
        self.codec.start_transmission()
        self.lun = lun
        lun.users.add(self)
        self.transmission = Transmission(
            lun,
            structured=self.negotiator.structured,
            base_allocation=self.negotiator.base_allocation,
        )
        log.info("NBD client %s attached to LUN %s", self.peer, lun.name)

    # -- control ----------------------------------------------------------------

    def close(self) -> None:
        """Stop reading; send what is queued, then close."""
        if self._closing:
            return
        self._closing = True
        self.codec.close()
        if self.transport is not None:
            self._send(self._out)
            self.transport.close()

    def revoke(self, reason: str) -> None:
        log.warning("closing NBD connection from %s: %s", self.peer, reason)
        self.close()


def _sendfile_some(sock_fd: int, piece: FileSlice) -> int:
    """Send as much of ``piece`` as the socket takes now; returns the bytes sent."""
    sent = 0
    try:
        while sent < piece.length:
            n = os.sendfile(sock_fd, piece.fd, piece.offset + sent, piece.length - sent)
            if n == 0:  # end of file: the rest reads as zeroes via the copy path
                break
            sent += n
    except BlockingIOError:
        pass
    except OSError as exc:
        log.debug("sendfile failed (%s); falling back to copying", exc)
    return sent


def _pread_full(piece: FileSlice, skip: int) -> bytes:
    length = piece.length - skip
    data = os.pread(piece.fd, length, piece.offset + skip)
    return data if len(data) == length else data + bytes(length - len(data))


def _enlarge_socket_buffers(transport: asyncio.BaseTransport) -> None:
    # A default socket buffer (~200 KiB) holds a fifth of a 1 MiB reply or
    # request; larger ones let one syscall move whole frames (capped by the
    # kernel at net.core.wmem_max / rmem_max).
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)


class NbdServer:
    def __init__(self, array: Array) -> None:
        self.array = array
        self.connections: set[NbdConnection] = set()
        self._servers: list[asyncio.Server] = []
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path: Path | None = None

    def resolve(self, name: str) -> Lun | None:
        return self.array.default_lun() if name == "" else self.array.find(name)

    def _factory(self) -> NbdConnection:
        return NbdConnection(self)

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._factory, host, port, reuse_address=True)
        self._servers.append(server)
        sockname = server.sockets[0].getsockname()
        self.tcp_address = (str(sockname[0]), int(sockname[1]))
        return self.tcp_address

    async def listen_unix(self, path: Path) -> Path:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of a daemon that died
        server = await loop.create_unix_server(self._factory, str(path))
        os.chmod(path, 0o600)
        self._servers.append(server)
        self.unix_path = path
        return path

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, let every connection send its queued replies, close."""
        for server in self._servers:
            server.close()
        for conn in list(self.connections):
            conn.close()
        waits = [conn.closed for conn in self.connections]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for conn in list(self.connections):
                if conn.transport is not None and pending:
                    conn.transport.abort()
        for server in self._servers:
            await server.wait_closed()
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


def _peer_name(peername: object, sock: socket.socket | None) -> str:
    """The peer as logs and "in use by" messages show it: "127.0.0.1:41234", or for a
    Unix socket the process behind it ("unix pid N")."""
    if isinstance(peername, tuple) and len(peername) >= 2:
        host = f"[{peername[0]}]" if ":" in str(peername[0]) else peername[0]
        return f"{host}:{peername[1]}"
    if peername:
        return str(peername)
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12) if sock else b""
        return f"unix pid {struct.unpack('3i', creds)[0]}"
    except (OSError, struct.error):
        return "unix"
