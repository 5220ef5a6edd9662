"""The asyncio shell around the iSCSI session machine: sockets, LUN workers,
backpressure, timeouts.

Each connection is an ``asyncio.BufferedProtocol`` whose receive buffer is the
PDU decoder's.  The loop only frames PDUs and runs the sans-I/O
:class:`~lunseal.frontends.iscsi.session.Connection`; SCSI commands go to the
LUN's worker thread, the commands of one receive for one LUN as ONE job,
whose results come back with ONE ``call_soon_threadsafe`` (as NBD does).
Commands for no LUN (REPORT LUNS, INQUIRY of an absent LUN) and LUNs without
a worker run inline.

Bounds: a connection stops reading while its unsent PDUs plus the data its
commands in flight stand for exceed :data:`QUEUE_CAP`; the decoder never holds
more than one PDU; the session holds at most its CmdSN window of tasks.  A
connection that has not logged in within ``login_timeout`` is dropped, and one
silent for ``keepalive`` seconds gets a NOP-In ping, and is closed if the ping
goes unanswered for another ``keepalive``.  A protocol error closes only its
own connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import cast

from lunseal.engine.backends.base import FileSlice
from lunseal.engine.lun import Lun
from lunseal.engine.worker import WorkerStopped
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi.access import AccessPolicy, OpenAccess
from lunseal.frontends.iscsi.session import (
    HARDWARE_ERROR,
    MAX_TRANSFER,
    SENSE_TOO_LONG,
    CommandWork,
    Connection,
    ScsiTargetLike,
    TmfWork,
    fixed_sense,
)
from lunseal.frontends.scsi.interface import CHECK_CONDITION, ScsiResult

log = logging.getLogger(__name__)

#: Unsent bytes plus data in flight above which a connection stops reading.
QUEUE_CAP = 32 << 20
#: Commands, and bytes of their data, handed to a worker in one job at most.
MAX_BATCH = 64
BATCH_BYTES = 4 << 20
#: Commands one job may gather from receives made while its worker was busy.
MAX_JOINED = 128
WRITE_HIGH_WATER = 8 << 20
WRITE_LOW_WATER = 2 << 20
SOCKET_BUFFER = 4 << 20
DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_LOGIN_TIMEOUT = 10.0
DEFAULT_KEEPALIVE = 30.0
SENSE_INTERNAL = fixed_sense(HARDWARE_ERROR, 0x44, 0x00)  # INTERNAL TARGET FAILURE


def default_target_name(array_id: str) -> str:
    return f"iqn.2026-12.io.lunseal:lunseal.{array_id}"


class IscsiConnection(asyncio.BufferedProtocol):
    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self._loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[None] = self._loop.create_future()
        self._inflight_bytes = 0
        self._inflight = 0
        #: The most bytes this connection ever had queued (for tests and stats).
        self.peak_queued = 0
        self._reading_paused = False
        self._write_paused = False
        self._closed = False
        self._registered = False
        self._heard = True  # something arrived since the last keep-alive tick
        self._timers: list[asyncio.TimerHandle] = []
        self._keepalive: asyncio.TimerHandle | None = None
        #: This connection's last command job while its worker has not started
        #: it: commands for the same LUN received meanwhile join it.
        self._waiting: _Job | None = None
        self._waiting_lock = threading.Lock()

    # -- asyncio.Protocol -----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.peer = _address(transport.get_extra_info("peername"))
        server = self.server
        if len(server.connections) >= server.max_connections:
            log.warning(
                "iSCSI connection from %s refused: %d connections open",
                self.peer,
                len(server.connections),
            )
            self.transport.abort()
            return
        server.connections.add(self)
        self.conn = Connection(
            server.target,
            target_name=server.target_name,
            policy=server.policy,
            portal=_address(transport.get_extra_info("sockname")),
            new_tsih=server.new_tsih,
        )
        self.conn.peer = self.peer
        self._timers.append(self._loop.call_later(server.login_timeout, self._login_expired))
        self._keepalive = self._loop.call_later(server.keepalive, self._keepalive_tick)
        log.debug("iSCSI connection from %s", self.peer)

    def get_buffer(self, sizehint: int) -> memoryview:
        if self.conn is None:
            return memoryview(bytearray(4096))  # refused: what arrives is dropped
        return self.conn.decoder.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        if self.conn is None:
            return
        self.conn.decoder.buffer_updated(nbytes)
        self._heard = True
        self._process()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        for timer in self._timers:
            timer.cancel()
        if self._keepalive is not None:
            self._keepalive.cancel()
        self.server.connections.discard(self)
        conn = self.conn
        if conn is not None:
            self.server.forget(self)
            if conn.nexus is not None:
                with contextlib.suppress(Exception):
                    self.server.target.nexus_gone(conn.nexus)
        if not self.closed.done():
            self.closed.set_result(None)
        log.debug("iSCSI connection from %s closed", self.peer)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if not self._closed and not self._backlogged():
            self._resume_reading()
            self._process()

    # -- processing -------------------------------------------------------------------

    @property
    def queued_bytes(self) -> int:
        """Unsent bytes plus the data of commands in flight."""
        buffered = self.transport.get_write_buffer_size() if self.transport else 0
        return buffered + self._inflight_bytes

    def _backlogged(self) -> bool:
        return self._write_paused or self.queued_bytes > QUEUE_CAP

    def _process(self) -> None:
        conn = self.conn
        if conn is None or self._closed:
            return
        was_full_feature = conn.full_feature
        pending = 0  # data the commands parsed since the last hand-off stand for
        try:
            while not conn.closing and not self._backlogged():
                pdu = conn.decoder.next_pdu()
                if pdu is None:
                    break
                conn.receive(pdu)
                if conn.full_feature and not was_full_feature:
                    was_full_feature = True
                    self._logged_in()
                if pdu.opcode == p.SCSI_COMMAND:
                    pending += pdu.u32(20)
                if len(conn.work) >= MAX_BATCH or pending >= BATCH_BYTES:
                    # Hand off now, so what is in flight counts for backpressure.
                    self._run_work()
                    pending = 0
        except p.PduError as exc:
            conn.fail(exc.message, exc.reject_reason, exc.header)
        except Exception:  # a bug must cost this connection only, never the target
            log.exception("iSCSI connection from %s: internal error; closing it", self.peer)
            self.abort()
            return
        self._run_work()
        self._flush()
        if not self._closed and not conn.closing and self._backlogged():
            self._pause_reading()

    def _logged_in(self) -> None:
        conn = self.conn
        assert conn is not None
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        self.server.register(self)
        log.info(
            "iSCSI %s session of %s from %s",
            conn.login.session_type.lower(),
            conn.login.initiator_name,
            self.peer,
        )

    def _flush(self) -> None:
        conn = self.conn
        if conn is None or self.transport is None or self._closed:
            return
        if conn.out:
            out, conn.out = conn.out, []
            self.transport.writelines(out)
            self.peak_queued = max(self.peak_queued, self.queued_bytes)
        if conn.closing and not self.transport.is_closing():
            if conn.reason and conn.reason != "logout":
                log.warning("iSCSI connection from %s: %s; closing it", self.peer, conn.reason)
            self.transport.close()  # after what is queued has been sent
            self._closed = True

    # -- work on LUN workers -------------------------------------------------------------

    def _run_work(self) -> None:
        conn = self.conn
        assert conn is not None
        if not conn.work:
            return
        work, conn.work = conn.work, []
        batch: list[CommandWork] = []
        batch_lun: Lun | None = None
        found: dict[int, Lun | None] = {}  # one lookup per LUN per receive
        for item in work:
            number = item.task.lun if isinstance(item, CommandWork) else item.lun
            if number not in found:
                found[number] = self._lun_of(number)
            lun = found[number]
            if batch and (lun is not batch_lun or isinstance(item, TmfWork)):
                # A TMF runs after every command queued before it on that worker.
                self._submit(batch_lun, batch)
                batch = []
            if isinstance(item, TmfWork):
                self._submit_tmf(lun, item)
                continue
            batch.append(item)
            batch_lun = lun
        if batch:
            self._submit(batch_lun, batch)

    def _lun_of(self, number: int) -> Lun | None:
        conn = self.conn
        assert conn is not None
        assert conn.nexus is not None
        if number < 0:
            return None
        return self.server.target.lun(conn.nexus, number)

    def _submit(self, lun: Lun | None, batch: list[CommandWork]) -> None:
        cost = sum(w.task.edtl for w in batch)
        self._inflight_bytes += cost
        self.peak_queued = max(self.peak_queued, self.queued_bytes)
        with self._waiting_lock:
            waiting = self._waiting
            if (
                waiting is not None
                and waiting.lun is lun
                and len(waiting.items) + len(batch) <= MAX_JOINED
            ):
                # The worker has not started this connection's last job for the
                # LUN: it runs these commands too, after its own (so in order),
                # and the hand-off, the batch stamps and the reply wake-up are
                # paid once for both.
                waiting.items.extend(batch)
                waiting.cost += cost
                return
            entry = _Job(lun, list(batch), cost)
            self._waiting = entry if lun is not None and lun.worker is not None else None
        self._inflight += 1
        target, lock = self.server.target, self._waiting_lock

        def job() -> list[ScsiResult]:
            with lock:  # from here on, later commands get a job of their own
                if self._waiting is entry:
                    self._waiting = None
            items = entry.items
            if lun is None:
                return [_execute(target, w) for w in items]
            # One job's commands as one batch: the tamper watch stamps the
            # backing file once for all of them, as for NBD.
            with lun.batch():
                return [_execute(target, w) for w in items]

        self._on_worker(
            lun, job, lambda results: self._commands_done(entry.items, results, entry.cost)
        )

    def _submit_tmf(self, lun: Lun | None, item: TmfWork) -> None:
        with self._waiting_lock:  # commands after the TMF must not join a job before it
            self._waiting = None
        self._inflight += 1

        def job() -> None:
            item.action()

        def done(_: object) -> None:
            self._inflight -= 1
            if self.conn is not None and not self._closed:
                self.conn.tmf_done(item)
                self._flush()

        self._on_worker(lun, job, done)

    def _on_worker(
        self, lun: Lun | None, job: Callable[[], object], done: Callable[[object], None]
    ) -> None:
        worker = lun.worker if lun is not None else None
        if worker is None:
            done(job())
            return
        loop = self._loop

        def run() -> None:
            result = job()
            with contextlib.suppress(RuntimeError):  # the loop is gone: nobody to tell
                loop.call_soon_threadsafe(done, result)

        try:
            worker.post(run)
        except WorkerStopped as exc:
            log.info("iSCSI connection from %s: %s; closing it", self.peer, exc.message)
            self.abort()

    def _commands_done(self, items: list[CommandWork], results: object, cost: int) -> None:
        self._inflight -= 1
        self._inflight_bytes -= cost
        conn = self.conn
        if conn is None or self._closed:
            return
        for work, result in zip(items, cast(list[ScsiResult], results), strict=True):
            conn.command_done(work.task, result)
        self._flush()
        if not conn.closing and not self._backlogged():
            self._resume_reading()
            if conn.decoder.buffered:
                self._process()

    # -- timers and control -----------------------------------------------------------

    def _login_expired(self) -> None:
        if self.conn is not None and not self.conn.full_feature and not self._closed:
            log.warning(
                "iSCSI connection from %s did not log in within %gs; closing it",
                self.peer,
                self.server.login_timeout,
            )
            self.abort()

    def _keepalive_tick(self) -> None:
        conn = self.conn
        if conn is None or self._closed:
            return
        if not self._heard and self._inflight == 0:
            if not conn.ping():
                log.warning(
                    "iSCSI initiator %s did not answer a NOP-In ping; closing the connection",
                    self.peer,
                )
                self.abort()
                return
            self._flush()
        self._heard = False
        self._keepalive = self._loop.call_later(self.server.keepalive, self._keepalive_tick)

    def _pause_reading(self) -> None:
        if not self._reading_paused and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self.transport is not None:
            self._reading_paused = False
            self.transport.resume_reading()

    def abort(self) -> None:
        self._closed = True
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send what is queued, then close (server shutdown)."""
        if self.transport is not None and not self.transport.is_closing():
            self._closed = True
            self.transport.close()


@dataclass
class _Job:
    """A command job handed to a LUN's worker; it grows until the worker starts it."""

    lun: Lun | None
    items: list[CommandWork]
    cost: int


def _execute(target: ScsiTargetLike, work: CommandWork) -> ScsiResult:
    """Run one command (on the LUN's worker); file slices are read here, off the loop."""
    try:
        result = target.execute(work.command)
        if isinstance(result.data, FileSlice):
            piece = result.data
            length = min(piece.length, work.task.edtl)
            if length > MAX_TRANSFER:
                # Never hold more than a bounded read in memory for one command.
                return ScsiResult(status=CHECK_CONDITION, sense=SENSE_TOO_LONG)
            # Only what the initiator takes is read; the rest counts as residual.
            work.task.produced = piece.length
            result.data = _read_slice(piece, length)
        return result
    except Exception:  # execute must not raise; if it does, one command fails, not the target
        log.exception("SCSI command 0x%02x failed", work.command.cdb[0])
        return ScsiResult(status=CHECK_CONDITION, sense=SENSE_INTERNAL)


def _read_slice(piece: FileSlice, length: int) -> bytes:
    data = os.pread(piece.fd, length, piece.offset)
    return data if len(data) == length else data + bytes(length - len(data))


def _address(name: object) -> str:
    if isinstance(name, tuple) and len(name) >= 2:
        host = f"[{name[0]}]" if ":" in str(name[0]) else str(name[0])
        return f"{host}:{name[1]}"
    return str(name)


class IscsiServer:
    def __init__(
        self,
        target: ScsiTargetLike,
        *,
        target_name: str,
        policy: AccessPolicy | None = None,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        login_timeout: float = DEFAULT_LOGIN_TIMEOUT,
        keepalive: float = DEFAULT_KEEPALIVE,
    ) -> None:
        self.target = target
        self.target_name = target_name
        self.policy: AccessPolicy = policy or OpenAccess()
        self.max_connections = max_connections
        self.login_timeout = login_timeout
        self.keepalive = keepalive
        self.connections: set[IscsiConnection] = set()
        self.sessions: dict[tuple[str, bytes], IscsiConnection] = {}
        self._tsih = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self.address: tuple[str, int] | None = None

    def new_tsih(self) -> int:
        while True:
            tsih = next(self._tsih) % 0x10000
            if tsih and all(c.conn is None or c.conn.tsih != tsih for c in self.sessions.values()):
                return tsih

    def register(self, connection: IscsiConnection) -> None:
        """A login completed: an older session with the same initiator and ISID
        is reinstated by this one (RFC 7143 6.3.5), so it is closed."""
        assert connection.conn is not None
        key = connection.conn.session_key
        old = self.sessions.get(key)
        if old is not None and old is not connection:
            log.info(
                "iSCSI session of %s reinstated from %s; closing the old one",
                key[0],
                connection.peer,
            )
            old.abort()
        self.sessions[key] = connection

    def access_changed(self) -> None:
        """The ACL changed: a session whose initiator would now log in with
        other access (or not at all) is closed, so the change applies at once;
        the initiator logs in again under the new rules."""
        for connection in list(self.connections):
            conn = connection.conn
            if conn is None or not conn.full_feature:
                continue
            now = self.policy.login(conn.login.initiator_name)
            if now != conn.login.access:
                log.info(
                    "iSCSI session of %s from %s closed: its access changed",
                    conn.login.initiator_name,
                    connection.peer,
                )
                connection.abort()

    def forget(self, connection: IscsiConnection) -> None:
        if connection.conn is None:
            return
        key = connection.conn.session_key
        if self.sessions.get(key) is connection:
            del self.sessions[key]

    async def listen(self, host: str, port: int) -> tuple[str, int]:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return await self.listen_socket(
            socket.create_server((host, port), family=family, backlog=128)
        )

    async def listen_socket(self, sock: socket.socket) -> tuple[str, int]:
        """Serve on a bound, listening socket (the daemon binds before it opens the array)."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: IscsiConnection(self), sock=sock)
        name = sock.getsockname()
        self.address = (str(name[0]), int(name[1]))
        return self.address

    @property
    def portal(self) -> str:
        assert self.address is not None
        return _address(self.address)

    async def close(self, timeout: float = 5.0) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.close()
        waits = [conn.closed for conn in self.connections]
        if waits:
            _done, pending = await asyncio.wait(waits, timeout=timeout)
            if pending:
                for conn in list(self.connections):
                    conn.abort()
