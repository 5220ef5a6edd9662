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
from pathlib import Path
from typing import cast

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.errors import ProtocolError
from lunseal.nbd import constants as c
from lunseal.nbd.codec import ClientFlags, OptionRequest, Request, ServerCodec
from lunseal.nbd.negotiation import Negotiator
from lunseal.nbd.transmission import Buffers, Transmission

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20


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
        self.closed = asyncio.get_running_loop().create_future()

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self.peer = str(transport.get_extra_info("peername") or "unix")
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
                # Flush large replies early so memory stays bounded by the high water mark.
                if len(out) > 64:
                    self._send(out)
        except ProtocolError as exc:
            log.warning("NBD client %s: %s; closing the connection", self.peer, exc.message)
            self._send(out)
            self.close()
            return
        self._send(out)

    def _send(self, out: Buffers) -> None:
        if out and self.transport is not None:
            self.transport.writelines(out)
            out.clear()

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
