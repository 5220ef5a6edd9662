"""A small blocking NBD client for host tools (backup, restore, demo).

Host tools talk to an array only through its API and NBD, as a program on
another machine would; this is their NBD side.  Fixed newstyle, OPT_GO, simple
replies (no structured replies are negotiated), one request at a time plus
pipelined reads for streaming.  URIs: ``nbd+unix:///EXPORT?socket=PATH``,
``nbd://HOST[:PORT]/EXPORT`` and ``nbds://HOST[:PORT]/EXPORT`` (STARTTLS,
the server verified with ``$LUNSEAL_CA_FILE`` or the system's CAs; a client
certificate from ``$LUNSEAL_TLS_CERT`` and ``$LUNSEAL_TLS_KEY`` if set).
"""

from __future__ import annotations

import contextlib
import os
import socket
import ssl
import struct
import urllib.parse
from collections.abc import Iterable, Iterator
from pathlib import Path

from lunseal.errors import (
    BackendError,
    InvalidArgument,
    LunsealError,
    NotFound,
    ProtocolError,
)
from lunseal.frontends.nbd import constants as c
from lunseal.tlsconfig import build_client_context

_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_OPTION_REPLY = struct.Struct(">QIII")
DEFAULT_PORT = 10809
PIPELINE = 8


CA_FILE_ENV = "LUNSEAL_CA_FILE"
CERT_ENV = "LUNSEAL_TLS_CERT"
KEY_ENV = "LUNSEAL_TLS_KEY"


def tls_context_from_env() -> ssl.SSLContext:
    """The context ``nbds://`` URIs use when the caller gives none."""

    def path(name: str) -> Path | None:
        value = os.environ.get(name)
        return Path(value) if value else None

    return build_client_context(path(CA_FILE_ENV), cert=path(CERT_ENV), key=path(KEY_ENV))


def connect_address(uri: str) -> tuple[int, str | tuple[str, int], str]:
    """(address family, address, export name) of an NBD URI."""
    parsed = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(parsed.path.lstrip("/"))
    if parsed.scheme == "nbd+unix":
        query = urllib.parse.parse_qs(parsed.query)
        if "socket" not in query:
            raise InvalidArgument(f"{uri}: nbd+unix URIs need ?socket=PATH")
        return socket.AF_UNIX, query["socket"][0], export
    if parsed.scheme in ("nbd", "nbds"):
        host = parsed.hostname or "localhost"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        return family, (host, parsed.port or DEFAULT_PORT), export
    raise InvalidArgument(f"{uri}: not an NBD URI (nbd://, nbds:// or nbd+unix://)")


class NbdClient:
    def __init__(
        self, uri: str, *, timeout: float = 60.0, tls: ssl.SSLContext | None = None
    ) -> None:
        family, address, self.export = connect_address(uri)
        if tls is None and uri.startswith("nbds:"):
            tls = tls_context_from_env()
        self._tls = tls
        self._server_name = address[0] if isinstance(address, tuple) else "localhost"
        self._sock: socket.socket = socket.socket(family, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        with contextlib.suppress(OSError):  # fewer wake-ups for multi-MiB replies
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        try:
            self._sock.connect(address)
            self.size, self.flags = self._handshake()
        except ssl.SSLError as exc:
            self._sock.close()
            raise BackendError(f"TLS with {uri} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            self._sock.close()
            raise BackendError(f"cannot connect to {uri}: {exc}") from exc
        except LunsealError:
            self._sock.close()
            raise
        self._cookie = 0

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def read_only(self) -> bool:
        return bool(self.flags & c.TF_READ_ONLY)

    # -- handshake ----------------------------------------------------------------

    def _recv(self, n: int) -> bytes:
        # recv_into one buffer: recv(n) would allocate n bytes per call, and a
        # 4 MiB read arrives in many calls.
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self._sock.recv_into(view[got:], n - got)
            if not k:
                raise ProtocolError("the NBD server closed the connection")
            got += k
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt_magic, _flags = struct.unpack(">QQH", self._recv(18))
        if magic != c.NBDMAGIC or opt_magic != c.IHAVEOPT:
            raise ProtocolError("not a fixed-newstyle NBD server")
        self._sock.sendall(struct.pack(">I", c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES))
        if self._tls is not None:
            self._starttls(self._tls)
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self._sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.OPT_GO, len(data)) + data)
        size = flags = -1
        while True:
            _magic, _opt, reply, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
            body = self._recv(length)
            if reply == c.REP_ACK:
                break
            if reply & 0x80000000:
                error = NotFound if reply == c.REP_ERR_UNKNOWN else LunsealError
                raise error(f"NBD export {self.export!r}: {body.decode(errors='replace')}")
            if reply == c.REP_INFO and struct.unpack(">H", body[:2])[0] == c.INFO_EXPORT:
                size, flags = struct.unpack(">QH", body[2:12])
        if size < 0:
            raise ProtocolError("the NBD server sent no export information")
        return size, flags

    def _starttls(self, context: ssl.SSLContext) -> None:
        self._sock.sendall(struct.pack(">QII", c.IHAVEOPT, c.OPT_STARTTLS, 0))
        _magic, _opt, reply, length = _OPTION_REPLY.unpack(self._recv(_OPTION_REPLY.size))
        body = self._recv(length)
        if reply != c.REP_ACK:
            raise LunsealError(
                f"the NBD server refused TLS: {body.decode(errors='replace') or hex(reply)}"
            )
        self._sock = context.wrap_socket(self._sock, server_hostname=self._server_name)

    # -- transmission -----------------------------------------------------------------

    def _send(
        self, kind: int, offset: int, length: int, payload: bytes = b"", flags: int = 0
    ) -> int:
        self._cookie += 1
        header = _REQUEST.pack(c.REQUEST_MAGIC, flags, kind, self._cookie, offset, length)
        self._sock.sendall(header + payload if len(payload) < 65536 else header)
        if len(payload) >= 65536:
            self._sock.sendall(payload)
        return self._cookie

    def _reply(self, cookie: int, data_length: int = 0) -> bytes:
        magic, error, got = _SIMPLE_REPLY.unpack(self._recv(_SIMPLE_REPLY.size))
        if magic != c.SIMPLE_REPLY_MAGIC or got != cookie:
            raise ProtocolError("unexpected NBD reply")
        if error:
            raise BackendError(f"NBD request failed with error {error}")
        return self._recv(data_length) if data_length else b""

    def read(self, offset: int, length: int) -> bytes:
        return self._reply(self._send(c.CMD_READ, offset, length), length)

    def read_ranges(self, ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
        """Read many ranges with up to PIPELINE requests in flight, in order."""
        pending: list[tuple[int, int, int]] = []
        for offset, length in ranges:
            pending.append((self._send(c.CMD_READ, offset, length), offset, length))
            if len(pending) >= PIPELINE:
                cookie, off, n = pending.pop(0)
                yield off, self._reply(cookie, n)
        for cookie, off, n in pending:
            yield off, self._reply(cookie, n)

    def write(self, offset: int, data: bytes, *, fua: bool = False) -> None:
        flags = c.CMD_FLAG_FUA if fua else 0
        self._reply(self._send(c.CMD_WRITE, offset, len(data), data, flags))

    def zero(self, offset: int, length: int) -> None:
        self._reply(self._send(c.CMD_WRITE_ZEROES, offset, length))

    def flush(self) -> None:
        self._reply(self._send(c.CMD_FLUSH, 0, 0))

    def close(self) -> None:
        try:
            self._send(c.CMD_DISC, 0, 0)
        except OSError:
            pass
        finally:
            self._sock.close()
