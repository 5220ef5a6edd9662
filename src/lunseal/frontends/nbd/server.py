"""The asyncio shell around the NBD codec: sockets, backpressure, shutdown.

Each connection is an ``asyncio.BufferedProtocol``: the kernel copies request
bytes straight into the codec's buffer.  The event loop only parses, checks
flags, dispatches and sends: the requests of one receive go to the LUN's
worker thread (:class:`lunseal.engine.worker.LunWorker`) as ONE job, which
runs them in order and hands the replies back with ONE
``call_soon_threadsafe``.  So a slow flush or disk on one LUN never holds up
the loop, and with it every other LUN's hosts.

WRITE payloads are not copied: the worker writes them straight from the
codec's receive buffer.  Each payload comes with its buffer's lease, given back
on the loop when the batch's replies return; until then the codec receives
into another buffer rather than over it (see ``codec.BufferLease``).

Ordering: a connection's batches queue on its LUN's single worker in the order
they were parsed, and come back through the loop's FIFO in that order.  Every
write of a LUN, from any connection, runs on that same worker, so a FLUSH runs
after every write whose reply was sent before it was received: it covers them
(MULTI_CONN).

Backpressure: requests in flight count as reply bytes (a read's length, a
write's payload) together with the replies not yet sent; past
``REPLY_QUEUE_CAP`` we stop reading until the worker and the client catch up.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import resource
import socket
import ssl
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import cast

from lunseal.engine.array import Array
from lunseal.engine.backends.base import FileSlice
from lunseal.engine.lun import Lun
from lunseal.engine.worker import WorkerStopped
from lunseal.errors import ProtocolError
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.access import Access, Peer, access_for, peer_of
from lunseal.frontends.nbd.codec import ClientFlags, OptionRequest, Request, ServerCodec
from lunseal.frontends.nbd.negotiation import Negotiator
from lunseal.frontends.nbd.transmission import ZERO_COPY_MIN, Buffers, Transmission
from lunseal.tlsconfig import ServerTls, TlsMode, peer_identities

log = logging.getLogger(__name__)

WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20
#: Unsent reply bytes (transport buffer plus pending pieces, file slices
#: included) above which a connection processes no further requests.
REPLY_QUEUE_CAP = 16 << 20
#: A file slice that cannot go zero-copy is copied this much at a time.
COPY_CHUNK = 1 << 20
SOCKET_BUFFER = 4 << 20
#: Connections served at once (both listeners together); more are refused at once.
DEFAULT_MAX_CONNECTIONS = 256
#: Seconds a client may take from connecting to entering transmission.
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
#: Descriptors kept out of the NBD connection budget (API, LUN files, catalog, logs).
FD_RESERVE = 128
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 32
#: Seconds between checks that the process can still open a descriptor.
FD_WATCH_INTERVAL = 1.0
#: Pause before accepting again after running out of descriptors.
ACCEPT_RETRY_DELAY = 0.5
#: Requests handed to the worker in one job at most (a receive may hold more).
MAX_BATCH = 128


class NbdConnection(asyncio.BufferedProtocol):
    def __init__(self, server: NbdServer, *, tls_mode: TlsMode = TlsMode.OFF) -> None:
        self.server = server
        self.codec = ServerCodec()
        self.tls_mode = tls_mode
        self.negotiator = self._new_negotiator(tls_active=False)
        #: The connection was upgraded with STARTTLS.
        self.tls_active = False
        #: The verified client certificate's identities ("cert:CN=...",
        #: "san:DNS:...", see lunseal.tlsconfig.peer_identities); empty in clear
        #: text and for clients without a certificate.
        self.client_identities: list[str] = []
        #: Between STARTTLS's ACK and the end of the TLS handshake: nothing is read.
        self._upgrading = False
        self._upgrade_task: asyncio.Task[None] | None = None
        self._peer = Peer()
        #: What the export ACL granted when transmission started.
        self.granted: Access | None = None
        self.transmission: Transmission | None = None
        self.lun: Lun | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._out: Buffers = []
        #: Reply pieces not handed to the transport yet: file slices stay slices
        #: (no memory) until the socket can take them.
        self._pending: deque[bytes | memoryview | FileSlice] = deque()
        self._pending_bytes = 0
        #: The most reply bytes this connection ever had queued (for tests and stats).
        self.peak_queued = 0
        self._write_paused = False
        self._reading_paused = False
        self._closing = False
        self._sock_fd = -1
        self._handshake_timer: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()
        self.closed = self._loop.create_future()
        #: Batches handed to the LUN's worker whose replies have not come back.
        self._inflight = 0
        #: Bytes those requests stand for (read lengths, write payloads).
        self._inflight_bytes = 0
        #: Set on revocation: replies still coming back are dropped, not sent.
        self._revoked = False
        #: The requests of this connection's last job while the worker has not
        #: started it: later requests join it rather than queue a job each.
        self._waiting: list[Request] | None = None
        self._waiting_lock = threading.Lock()

    # -- asyncio.Protocol -------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        _enlarge_socket_buffers(transport)
        sock = transport.get_extra_info("socket")
        self._sock_fd = sock.fileno() if sock is not None else -1
        self.peer = _peer_name(transport.get_extra_info("peername"), sock)
        self._peer = peer_of(sock, transport.get_extra_info("peername"), ())
        self.server.connections.add(self)
        timeout = self.server.handshake_timeout
        if timeout is not None:
            loop = asyncio.get_running_loop()
            self._handshake_timer = loop.call_later(timeout, self._handshake_expired)
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
        self._cancel_handshake_timer()
        self._drop_pending()
        self.server.connections.discard(self)
        if self.lun is not None:
            self.lun.users.discard(self)
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("NBD connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._pump_safely():
            return
        if not self._closing and not self._backlogged():
            self._resume_reading()
            self._process()  # complete requests may be waiting in the buffer

    # -- processing -------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Reply bytes not sent yet: in the transport plus pending (file slices too)."""
        buffered = self.transport.get_write_buffer_size() if self.transport else 0
        return buffered + self._pending_bytes

    def _backlogged(self) -> bool:
        return self._room() <= 0

    def _room(self) -> int:
        """Reply bytes this connection may still take on before it stops reading."""
        if self._write_paused:
            return 0
        return REPLY_QUEUE_CAP - self.queued_bytes - self._inflight_bytes

    def _process(self) -> None:
        out = self._out
        batch: list[Request] = []
        next_event = self.codec.next_event
        try:
            # A request adds at most its length; the exact room (a transport
            # call) is measured again only once this estimate runs out.
            room = self._room()
            while room > 0 and not self._closing and not self._upgrading:
                event = next_event()
                if event is None:
                    break
                if isinstance(event, Request):
                    self._request(event, batch)
                    room -= event.length
                    if len(batch) >= MAX_BATCH:
                        self._dispatch(batch)
                        batch = []
                    if len(out) > 64:
                        self._send(out)  # replies read from the cache: keep them bounded
                        room = 0
                    if room <= 0:
                        room = self._room()
                else:
                    self._negotiate(event, out)
            self._dispatch(batch)
            if out:
                self._send(out)
        except ProtocolError as exc:
            log.warning("NBD client %s: %s; closing the connection", self.peer, exc.message)
            self.close()
            return
        except OSError as exc:
            self._send_failed(exc)
            return
        if not self._closing and self._backlogged():
            # Stop reading requests until the client takes its replies.
            self._pause_reading()

    def _send(self, out: Buffers) -> None:
        """Queue reply pieces in order and send what the socket takes."""
        for piece in out:
            self._pending.append(piece)
            self._pending_bytes += piece.length if isinstance(piece, FileSlice) else len(piece)
        out.clear()
        self.peak_queued = max(self.peak_queued, self.queued_bytes)
        self._pump()

    def _pump(self) -> None:
        """Move pending pieces into the transport until it asks us to pause.

        The transport's own buffer is bounded by its high water mark (plus one
        copied chunk); the rest waits here, file slices unread."""
        transport = self.transport
        if transport is None:
            return
        batch: list[bytes | memoryview] = []
        pending = self._pending
        while pending and not self._write_paused:
            piece = pending[0]
            if not isinstance(piece, FileSlice):
                batch.append(piece)
                self._pending_bytes -= len(piece)
                pending.popleft()
                continue
            if piece.length < ZERO_COPY_MIN:
                batch.append(_pread_full(piece, 0))
                self._pending_bytes -= piece.length
                pending.popleft()
                continue
            if batch:
                transport.writelines(batch)  # may pause us: re-check before the slice
                batch = []
                continue
            done = self._send_file_part(transport, piece)
            self._pending_bytes -= done
            if done == piece.length:
                pending.popleft()
            else:
                pending[0] = FileSlice(piece.fd, piece.offset + done, piece.length - done)
        if batch:
            transport.writelines(batch)
        if self._closing and not pending and not self._inflight and not transport.is_closing():
            transport.close()

    def _pump_safely(self) -> bool:
        try:
            self._pump()
        except OSError as exc:
            self._send_failed(exc)
            return False
        return True

    def _send_file_part(self, transport: asyncio.Transport, piece: FileSlice) -> int:
        """Send the start of ``piece``; returns how many of its bytes are gone."""
        # sendfile writes to the socket behind the transport's back, which keeps
        # the byte order only while the transport has nothing queued.
        sent = 0
        if self._sock_fd >= 0 and transport.get_write_buffer_size() == 0:
            sent = _sendfile_some(self._sock_fd, piece)
            if sent == piece.length:
                return sent
        # The socket is full (or sendfile is unavailable): copy one bounded chunk
        # so the transport can finish it when the socket drains.
        n = min(piece.length - sent, COPY_CHUNK)
        transport.write(_pread_range(piece, sent, n))
        return sent + n

    def _send_failed(self, exc: OSError) -> None:
        # A reply whose header is out cannot be turned into an error any more.
        log.error("NBD client %s: sending a reply failed: %s; dropping", self.peer, exc)
        self._out.clear()
        self._drop_pending()
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _drop_pending(self) -> None:
        self._pending.clear()
        self._pending_bytes = 0

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def _request(self, req: Request, batch: list[Request]) -> None:
        if req.type == c.CMD_DISC:
            # Requests before it still run and get their replies: close() waits
            # for batches in flight before it closes the transport.
            self._dispatch(batch)
            batch.clear()
            self.close()
            return
        assert self.transmission is not None
        if not self.transmission.check(req, self._out):
            # An error reply queued now may overtake replies of earlier requests
            # still in flight; NBD replies are matched by cookie, not order.
            if req.lease is not None:
                req.lease.give_back()
            return
        if not batch and not self._inflight and self.transmission.read_cached(req, self._out):
            # Served from the page cache without waiting for a disk: no thread
            # hop.  Only with nothing of this connection queued before it, so a
            # read never overtakes this connection's own earlier writes.
            return
        self._inflight_bytes += req.length
        batch.append(req)

    def _dispatch(self, batch: list[Request]) -> None:
        """Hand ``batch`` to the LUN's worker as one job (inline if it has none)."""
        if not batch:
            return
        assert self.transmission is not None
        assert self.lun is not None
        transmission = self.transmission
        worker = self.lun.worker
        if worker is None:
            self._inflight += 1
            reqs = list(batch)
            self._deliver(_execute(transmission, reqs), _cost(reqs), reqs)
            return
        with self._waiting_lock:
            waiting = self._waiting
            if waiting is not None and len(waiting) + len(batch) <= MAX_BATCH:
                # The worker has not started this connection's last job yet: it
                # takes these requests too (after its own, so in order), and
                # the worker pays its per-batch costs once for both.
                waiting.extend(batch)
                return
            reqs = self._waiting = list(batch)
        self._inflight += 1
        loop, deliver, lock = self._loop, self._deliver, self._waiting_lock

        def job() -> None:
            with lock:  # from here on, later requests get a job of their own
                if self._waiting is reqs:
                    self._waiting = None
            replies = _execute(transmission, reqs)
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                loop.call_soon_threadsafe(deliver, replies, _cost(reqs), reqs)

        try:
            worker.post(job)
        except WorkerStopped as exc:
            # The LUN is being deleted or closed: its revocation closes us too.
            log.debug("NBD client %s: %s", self.peer, exc.message)
            with lock:
                self._waiting = None
            self._deliver([], _cost(reqs), reqs)

    def _deliver(self, replies: Buffers, cost: int, reqs: list[Request]) -> None:
        """Back on the loop: queue a batch's replies and read on if there is room."""
        for req in reqs:
            if req.lease is not None:
                # The worker is done with the payload: the codec may reuse its buffer.
                req.lease.give_back()
        self._inflight -= 1
        self._inflight_bytes -= cost
        if self._revoked or self.transport is None or self.transport.is_closing():
            if self._closing and self._inflight == 0 and self.transport is not None:
                self._pump_safely()  # closes the transport once nothing is left
            return
        try:
            self._send(replies)
        except OSError as exc:
            self._send_failed(exc)
            return
        if not self._closing and not self._backlogged():
            self._resume_reading()
            if self.codec.pending_bytes:
                self._process()  # complete requests may be waiting in the buffer

    def _negotiate(self, event: ClientFlags | OptionRequest, out: Buffers) -> None:
        if isinstance(event, ClientFlags):
            self.negotiator.no_zeroes = event.no_zeroes
            return
        outcome = self.negotiator.handle(event.option, event.data, oversize=event.oversize)
        out.extend(outcome.replies)
        if outcome.close:
            self.close()
        elif outcome.starttls:
            self._start_tls(out)
        elif outcome.lun is not None:
            self._start_transmission(outcome.lun, outcome.read_only)

    # -- TLS ----------------------------------------------------------------------

    def _new_negotiator(self, *, tls_active: bool) -> Negotiator:
        return Negotiator(
            resolve=self.server.resolve,
            list_exports=self.server.array.luns,
            tls_mode=self.tls_mode,
            tls_active=tls_active,
            access=self.access_to,
        )

    def _start_tls(self, out: Buffers) -> None:
        tls = self.server.tls
        assert tls is not None  # the negotiator offers STARTTLS only with TLS configured
        if self.codec.pending_bytes:
            # Bytes sent after STARTTLS but before the handshake would be
            # clear text smuggled into the encrypted session.
            out.pop()  # no ACK: the client must not start a handshake on it
            raise ProtocolError("client sent data after STARTTLS before the TLS handshake")
        self._send(out)  # the ACK goes out in clear, ahead of the handshake
        self._upgrading = True
        # Kept: the loop holds only a weak reference to a task.
        self._upgrade_task = self._loop.create_task(self._upgrade(tls.context))

    def _upgrade_failed(self, raw: asyncio.Transport) -> None:
        raw.abort()
        if not self.closed.done():
            self.connection_lost(None)  # the TLS layer does not report it mid-handshake

    async def _upgrade(self, context: ssl.SSLContext) -> None:
        raw = self.transport
        assert raw is not None
        try:
            transport = await self._loop.start_tls(
                raw, self, context, server_side=True, ssl_handshake_timeout=None
            )
        except (OSError, ssl.SSLError, EOFError, asyncio.CancelledError) as exc:
            log.warning("NBD client %s: TLS handshake failed: %s", self.peer, exc or "aborted")
            self._upgrade_failed(raw)
            return
        if transport is None or transport.is_closing() or self._closing:
            # The connection went away mid-handshake (the handshake timer, a
            # server shutdown): the TLS layer ends the wait without an error.
            if transport is not None:
                transport.abort()
            self._upgrade_failed(raw)
            return
        self.transport = transport
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        self._sock_fd = -1  # sendfile would bypass the encryption
        self.tls_active = True
        ssl_object = transport.get_extra_info("ssl_object")
        peercert = ssl_object.getpeercert() if ssl_object is not None else None
        self.client_identities = peer_identities(peercert)
        # Nothing negotiated in clear text carries over (structured replies,
        # meta contexts): a man in the middle could have chosen it.
        no_zeroes = self.negotiator.no_zeroes
        self.negotiator = self._new_negotiator(tls_active=True)
        self.negotiator.no_zeroes = no_zeroes
        self._upgrading = False
        log.info(
            "NBD client %s upgraded to TLS (%s)%s",
            self.peer,
            ssl_object.version() if ssl_object is not None else "?",
            f" as {', '.join(self.client_identities)}" if self.client_identities else "",
        )
        self._process()

    def access_to(self, lun: Lun) -> Access:
        """What the export ACL lets this client do with ``lun`` now."""
        peer = Peer(self._peer.address, self._peer.uid, tuple(self.client_identities))
        return access_for(self.server.array.catalog.nbd_access, lun, peer)

    def _start_transmission(self, lun: Lun, read_only: bool = False) -> None:
        self.codec.start_transmission()
        self._cancel_handshake_timer()
        self.lun = lun
        lun.users.add(self)
        self.transmission = Transmission(
            lun,
            structured=self.negotiator.structured,
            base_allocation=self.negotiator.base_allocation,
            read_only=read_only,
        )
        self.granted = Access.READ_ONLY if read_only else Access.READ_WRITE
        log.info("NBD client %s attached to LUN %s", self.peer, lun.name)

    def _handshake_expired(self) -> None:
        self._handshake_timer = None
        if self._closing or self.transmission is not None:
            return
        log.warning(
            "NBD client %s did not finish negotiating within %gs; closing the connection",
            self.peer,
            self.server.handshake_timeout,
        )
        self._closing = True
        if self.transport is not None:
            self.transport.abort()

    def _cancel_handshake_timer(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None

    # -- control ----------------------------------------------------------------

    def close(self) -> None:
        """Stop reading; send what is queued, then close."""
        if self._closing:
            return
        self._closing = True
        self.codec.close()
        if self.transport is not None:
            self._resume_reading()  # so the client's EOF or reset is noticed
            out, self._out = self._out, []
            try:
                self._send(out)  # closes the transport once everything is out
            except OSError as exc:
                self._send_failed(exc)

    def revoke(self, reason: str) -> None:
        log.warning("closing NBD connection from %s: %s", self.peer, reason)
        # Pending file slices refer to the LUN's file, which is about to go away;
        # so may slices the worker is still producing.
        self._revoked = True
        self._drop_pending()
        self.close()


def _cost(reqs: list[Request]) -> int:
    """What requests in flight count against the reply cap (see ``_inflight_bytes``)."""
    return sum(req.length for req in reqs)


def _execute(transmission: Transmission, reqs: list[Request]) -> Buffers:
    """Run a batch in order (on the LUN's worker); its replies, in order."""
    out: Buffers = []
    transmission.execute_batch(reqs, out)
    return out


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
    return _pread_range(piece, skip, piece.length - skip)


def _pread_range(piece: FileSlice, skip: int, length: int) -> bytes:
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


class _Throttled:
    """A log line at most once per ``period`` seconds, counting what it held back."""

    def __init__(self, period: float = 10.0) -> None:
        self.period = period
        self._next = 0.0
        self._held = 0

    def log(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next:
            self._held += 1
            return
        if self._held:
            message += f" ({self._held} more like this since the last report)"
        self._held = 0
        self._next = now + self.period
        log.log(level, message, *args)


class NbdServer:
    def __init__(
        self,
        array: Array,
        *,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        handshake_timeout: float | None = DEFAULT_HANDSHAKE_TIMEOUT,
        tls: ServerTls | None = None,
    ) -> None:
        self.array = array
        #: The daemon's TLS holder (None: no certificates; its mode may still be
        #: off when only the API uses them).  SIGHUP reloads it.  The Unix socket offers
        #: STARTTLS but never requires it: only local users reach it, and its
        #: mode 0600 already limits them to root.
        self.tls = tls
        self.connections: set[NbdConnection] = set()
        self.max_connections = _fd_bounded(max_connections)
        self.handshake_timeout = handshake_timeout
        self._listeners: list[socket.socket] = []
        self._attaching = 0
        self._spare_fd = _open_spare_fd()
        self._fd_watch: asyncio.Task[None] | None = None
        self._refused_log = _Throttled()
        self._fd_log = _Throttled()
        self.tcp_address: tuple[str, int] | None = None
        self.unix_path: Path | None = None
        self._acl_hook: Callable[[str], None] | None = None

    def resolve(self, name: str) -> Lun | None:
        return self.array.default_lun() if name == "" else self.array.find(name)

    def access_changed(self) -> None:
        """After an export ACL change: end every connection in transmission whose
        access differs now (one that lost it, or moved between ro and rw).  Ones
        still negotiating are checked at each option anyway."""
        for conn in list(self.connections):
            if conn.lun is None or conn.granted is None:
                continue
            now = conn.access_to(conn.lun)
            if now is not conn.granted:
                conn.revoke(f"its NBD access to LUN {conn.lun.name} changed to {now.value}")

    def _factory(self, family: int = socket.AF_INET) -> NbdConnection:
        return NbdConnection(self, tls_mode=self._tls_mode(family))

    @property
    def tls_offered(self) -> bool:
        """STARTTLS is offered on the TCP listener (clients should use nbds://)."""
        return self.tls is not None and self.tls.mode != TlsMode.OFF

    def _tls_mode(self, family: int) -> TlsMode:
        if self.tls is None or self.tls.mode == TlsMode.OFF:
            return TlsMode.OFF
        if family == socket.AF_UNIX:
            return TlsMode.ALLOW
        return self.tls.mode

    async def listen_tcp(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.create_server((host, port), family=family, backlog=LISTEN_BACKLOG)
        return await self.listen_tcp_socket(sock)

    async def listen_tcp_socket(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on a bound socket: the daemon binds before it creates its data
        directory, so a busy port fails before anything is written."""
        sock.listen(LISTEN_BACKLOG)
        self._listen(sock)
        sockname = sock.getsockname()
        self.tcp_address = (str(sockname[0]), int(sockname[1]))
        return self.tcp_address

    async def listen_unix(self, path: Path) -> Path:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # a stale socket of a daemon that died
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(path))
            os.chmod(path, 0o600)
            sock.listen(LISTEN_BACKLOG)
        except BaseException:
            sock.close()
            raise
        self._listen(sock)
        self.unix_path = path
        return path

    # -- accepting --------------------------------------------------------------
    #
    # Our own accept loop rather than loop.create_server: uvloop answers
    # running out of file descriptors by silently dropping clients (or by
    # closing the listener for good), and the connection cap is cheapest
    # before a transport exists.

    def _listen(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._listeners.append(sock)
        loop = asyncio.get_running_loop()
        loop.add_reader(sock.fileno(), self._accept, sock)
        if self._fd_watch is None:
            self._fd_watch = loop.create_task(self._watch_descriptors())
        if self._acl_hook is None:
            self._acl_hook = self._on_acl_change_from(loop)
            self.array.catalog.nbd_access.on_change.append(self._acl_hook)

    def _on_acl_change_from(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        def changed(_lun_uuid: str) -> None:
            # Every connection is checked, not only the LUN's users: cheap, and
            # the same path serves any later change that spans LUNs.  On the
            # loop (the API's routes) at once, so the change holds when the
            # call returns.
            try:
                here = asyncio.get_running_loop() is loop
            except RuntimeError:
                here = False
            if here:
                self.access_changed()
            elif not loop.is_closed():
                loop.call_soon_threadsafe(self.access_changed)

        return changed

    async def _watch_descriptors(self) -> None:
        """Say so when the process runs out of descriptors.

        The API (uvicorn on uvloop) drops clients silently in that state; a
        probe once a second is the cheapest way to give it a log line too."""
        while True:
            await asyncio.sleep(FD_WATCH_INTERVAL)
            try:
                os.close(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    continue  # not what this watch is about
                self._fd_log.log(
                    logging.ERROR,
                    "the process is out of file descriptors (%s, open file limit %d, "
                    "%d NBD connections): the API and NBD cannot accept new clients",
                    exc.strerror,
                    resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                    len(self.connections),
                )

    def _accept(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(sock, exc)
                return
            if self._full():
                self._refuse(conn)
                continue
            conn.setblocking(False)
            self._attaching += 1
            asyncio.get_running_loop().create_task(self._attach(conn, sock.family))

    def _full(self) -> bool:
        return len(self.connections) + self._attaching >= self.max_connections

    def _refuse(self, conn: socket.socket) -> None:
        peer = _socket_peer(conn)
        conn.close()
        self._refused_log.log(
            logging.WARNING,
            "NBD connection from %s refused: %d connections open, the limit "
            "(--max-connections) is %d",
            peer,
            len(self.connections) + self._attaching,
            self.max_connections,
        )

    async def _attach(self, conn: socket.socket, family: int) -> None:
        try:
            _transport, protocol = await asyncio.get_running_loop().connect_accepted_socket(
                partial(self._factory, family), conn
            )
            if not self._listeners:
                protocol.close()  # the server closed while this one was being set up
        except OSError as exc:
            log.warning("NBD connection from %s failed to start: %s", _socket_peer(conn), exc)
            conn.close()
        finally:
            self._attaching -= 1

    def _accept_failed(self, sock: socket.socket, exc: OSError) -> None:
        if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            log.error("accepting an NBD connection failed: %s", exc)
            return
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._fd_log.log(
            logging.ERROR,
            "cannot accept NBD connections: %s (open file limit %d, %d NBD connections); "
            "refusing new clients until some disconnect",
            exc.strerror,
            soft,
            len(self.connections),
        )
        self._shed_one(sock)
        # Stop polling the listener for a moment instead of spinning on it.
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        loop.call_later(ACCEPT_RETRY_DELAY, self._resume_accepting, sock)

    def _shed_one(self, sock: socket.socket) -> None:
        """Accept and close one waiting client with the spare descriptor, so it
        learns at once that it was refused instead of hanging in the backlog."""
        if self._spare_fd < 0:
            return
        os.close(self._spare_fd)
        self._spare_fd = -1
        with contextlib.suppress(OSError):
            conn, _addr = sock.accept()
            conn.close()
        self._spare_fd = _open_spare_fd()

    def _resume_accepting(self, sock: socket.socket) -> None:
        if sock in self._listeners:
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock)
            self._accept(sock)

    def _stop_listening(self) -> None:
        if self._fd_watch is not None:
            self._fd_watch.cancel()
            self._fd_watch = None
        loop = asyncio.get_running_loop()
        for sock in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._listeners.clear()
        if self._acl_hook is not None:
            with contextlib.suppress(ValueError):
                self.array.catalog.nbd_access.on_change.remove(self._acl_hook)
            self._acl_hook = None

    async def close(self, timeout: float = 10.0) -> None:
        """Stop accepting, let every connection send its queued replies, close."""
        self._stop_listening()
        for conn in list(self.connections):
            conn.close()
        waits = [conn.closed for conn in self.connections]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            for conn in list(self.connections):
                if conn.transport is not None and pending:
                    conn.transport.abort()
        if self._spare_fd >= 0:
            os.close(self._spare_fd)
            self._spare_fd = -1
        if self.unix_path is not None:
            self.unix_path.unlink(missing_ok=True)


def _open_spare_fd() -> int:
    try:
        return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return -1


def _socket_peer(conn: socket.socket) -> str:
    try:
        return _peer_name(conn.getpeername(), conn)
    except OSError:
        return "?"


def _fd_bounded(wanted: int) -> int:
    """``wanted``, lowered so NBD clients cannot take the descriptors the API,
    the LUN files and the catalog need."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return wanted
    budget = max(1, soft - FD_RESERVE) if soft > 2 * FD_RESERVE else max(1, soft // 2)
    if wanted > budget:
        log.warning(
            "NBD connection limit lowered from %d to %d: the open file limit is %d "
            "(raise it with ulimit -n)",
            wanted,
            budget,
            soft,
        )
        return budget
    return wanted


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
