"""A raw NBD client for tests: it sends what real clients refuse to send.

Blocking sockets with a timeout, one request at a time or pipelined by hand.
Nothing here validates what the test asks to send; replies are parsed
strictly, so a server that breaks the framing fails the test.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from itertools import count, pairwise

from lunseal.frontends.nbd import constants as c

TIMEOUT = 10.0

_OPTION_HEADER = struct.Struct(">QII")
_OPTION_REPLY = struct.Struct(">QIII")
_REQUEST = struct.Struct(">IHHQQI")


class OptionFailed(Exception):
    """The server answered an option with an error reply."""

    def __init__(self, reply: OptionReply) -> None:
        super().__init__(f"option {reply.option} failed with {reply.type:#x}: {reply.text}")
        self.reply = reply


@dataclass(frozen=True)
class OptionReply:
    option: int
    type: int
    data: bytes

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x80000000)

    @property
    def text(self) -> str:
        return self.data.decode() if self.is_error else ""


@dataclass(frozen=True)
class Export:
    size: int
    flags: int
    #: NBD_REP_INFO payloads by info type (without the type field).
    infos: dict[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class SimpleReply:
    cookie: int
    error: int
    data: bytes = b""


@dataclass(frozen=True)
class Chunk:
    cookie: int
    flags: int
    type: int
    payload: bytes

    @property
    def done(self) -> bool:
        return bool(self.flags & c.REPLY_FLAG_DONE)

    @property
    def is_error(self) -> bool:
        return bool(self.type & 0x8000)

    def error(self) -> tuple[int, str]:
        """Error number and message of an error chunk (length fields checked)."""
        errno, n = struct.unpack_from(">IH", self.payload)
        extra = 8 if self.type == c.REPLY_TYPE_ERROR_OFFSET else 0
        assert len(self.payload) == 6 + n + extra, "error chunk length mismatch"
        return errno, self.payload[6 : 6 + n].decode()

    def offset_data(self) -> tuple[int, bytes]:
        assert self.type == c.REPLY_TYPE_OFFSET_DATA
        assert len(self.payload) > 8
        return struct.unpack_from(">Q", self.payload)[0], self.payload[8:]

    def hole(self) -> tuple[int, int]:
        assert self.type == c.REPLY_TYPE_OFFSET_HOLE
        assert len(self.payload) == 12
        offset, size = struct.unpack(">QI", self.payload)
        return offset, size

    def extents(self) -> tuple[int, list[tuple[int, int]]]:
        """Context id and (length, flags) pairs of a BLOCK_STATUS chunk."""
        assert self.type == c.REPLY_TYPE_BLOCK_STATUS
        assert len(self.payload) >= 12
        assert (len(self.payload) - 4) % 8 == 0
        (context,) = struct.unpack_from(">I", self.payload)
        pairs = [
            struct.unpack_from(">II", self.payload, pos) for pos in range(4, len(self.payload), 8)
        ]
        return context, [(n, f) for n, f in pairs]


Message = SimpleReply | Chunk


@dataclass
class Reply:
    """Everything the server sent for one request."""

    cookie: int
    error: int = 0
    data: bytes = b""
    chunks: list[Chunk] = field(default_factory=list)
    simple: bool = True
    #: Where the first content chunk starts (structured replies only).
    offset: int | None = None


def parse_option_reply(raw: bytes) -> OptionReply:
    """Parse one complete option reply (as the negotiator returns them)."""
    magic, option, kind, length = _OPTION_REPLY.unpack_from(raw)
    assert magic == c.OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
    assert len(raw) == _OPTION_REPLY.size + length, "option reply length mismatch"
    return OptionReply(option, kind, raw[_OPTION_REPLY.size :])


def option_header(option: int, length: int, magic: int = c.IHAVEOPT) -> bytes:
    return _OPTION_HEADER.pack(magic, option, length)


def request_header(
    kind: int,
    offset: int = 0,
    length: int = 0,
    *,
    flags: int = 0,
    cookie: int = 0,
    magic: int = c.REQUEST_MAGIC,
) -> bytes:
    return _REQUEST.pack(magic, flags, kind, cookie, offset, length)


def info_request(name: str, infos: tuple[int, ...] = ()) -> bytes:
    raw = name.encode()
    types = b"".join(struct.pack(">H", i) for i in infos)
    return struct.pack(">I", len(raw)) + raw + struct.pack(">H", len(infos)) + types


def meta_context_request(name: str, queries: tuple[str, ...]) -> bytes:
    raw = name.encode()
    parts = [struct.pack(">I", len(raw)), raw, struct.pack(">I", len(queries))]
    for query in queries:
        parts += [struct.pack(">I", len(query.encode())), query.encode()]
    return b"".join(parts)


class NbdClient:
    def __init__(self, sock: socket.socket, timeout: float = TIMEOUT) -> None:
        self.sock = sock
        self.timeout = timeout
        sock.settimeout(timeout)
        self.structured = False
        self._cookies = count(1)
        self._read_lengths: dict[int, int] = {}

    @classmethod
    def connect(cls, address: str | tuple[str, int], timeout: float = TIMEOUT) -> NbdClient:
        """A unix socket path, or a (host, port) pair for TCP."""
        if isinstance(address, str):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(address)
        except BaseException:
            sock.close()
            raise
        return cls(sock, timeout)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- raw bytes ---------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            part = self.sock.recv(min(n - len(buf), 1 << 20))
            if not part:
                raise EOFError(f"server closed after {len(buf)} of {n} bytes")
            buf += part
        return bytes(buf)

    def drain_to_eof(self, timeout: float = 30.0) -> bytes:
        """Whatever the server still sends before it closes; TimeoutError if it does not."""
        self.sock.settimeout(timeout)
        buf = bytearray()
        try:
            while part := self.sock.recv(1 << 16):
                buf += part
        except ConnectionResetError:
            pass
        finally:
            self.sock.settimeout(self.timeout)
        return bytes(buf)

    # -- handshake ---------------------------------------------------------------

    def read_greeting(self) -> int:
        magic, opt_magic, flags = struct.unpack(">QQH", self.recv_exact(18))
        assert (magic, opt_magic) == (c.NBDMAGIC, c.IHAVEOPT), "bad greeting"
        return int(flags)

    def handshake(self, client_flags: int = c.FLAG_FIXED_NEWSTYLE | c.FLAG_NO_ZEROES) -> int:
        """Read the greeting and answer it; returns the server's handshake flags."""
        flags = self.read_greeting()
        self.send(struct.pack(">I", client_flags))
        return flags

    def send_option(self, option: int, data: bytes = b"") -> None:
        self.send(option_header(option, len(data)) + data)

    def read_option_reply(self) -> OptionReply:
        magic, option, kind, length = _OPTION_REPLY.unpack(self.recv_exact(_OPTION_REPLY.size))
        assert magic == c.OPTION_REPLY_MAGIC, f"bad option reply magic {magic:#x}"
        return OptionReply(option, kind, self.recv_exact(length))

    def option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        """Send an option and read its replies up to the final ACK or error."""
        self.send_option(option, data)
        replies = [self.read_option_reply()]
        while replies[-1].type != c.REP_ACK and not replies[-1].is_error:
            replies.append(self.read_option_reply())
        assert all(r.option == option for r in replies), "reply to the wrong option"
        return replies

    def checked_option(self, option: int, data: bytes = b"") -> list[OptionReply]:
        replies = self.option(option, data)
        if replies[-1].is_error:
            raise OptionFailed(replies[-1])
        return replies

    def structured_reply(self) -> None:
        self.checked_option(c.OPT_STRUCTURED_REPLY)
        self.structured = True

    def set_meta_context(self, export: str, *queries: str) -> dict[int, str]:
        data = meta_context_request(export, queries)
        replies = self.checked_option(c.OPT_SET_META_CONTEXT, data)
        return {
            struct.unpack_from(">I", r.data)[0]: r.data[4:].decode()
            for r in replies
            if r.type == c.REP_META_CONTEXT
        }

    def go(self, export: str = "", infos: tuple[int, ...] = (), option: int = c.OPT_GO) -> Export:
        """INFO or GO; raises OptionFailed on an error reply."""
        replies = self.checked_option(option, info_request(export, infos))
        found = {
            struct.unpack_from(">H", r.data)[0]: r.data[2:] for r in replies if r.type == c.REP_INFO
        }
        size, flags = struct.unpack(">QH", found[c.INFO_EXPORT])
        return Export(size, flags, found)

    def export_name(self, export: str, *, no_zeroes: bool = True) -> Export:
        self.send_option(c.OPT_EXPORT_NAME, export.encode())
        size, flags = struct.unpack(">QH", self.recv_exact(10))
        if not no_zeroes:
            assert self.recv_exact(124) == bytes(124)
        return Export(size, flags)

    def connect_export(self, export: str = "", *, structured: bool = False) -> Export:
        """Handshake, optionally structured replies + base:allocation, then GO."""
        self.handshake()
        if structured:
            self.structured_reply()
            self.set_meta_context(export, "base:allocation")
        return self.go(export)

    # -- transmission --------------------------------------------------------------

    def send_request(
        self,
        kind: int,
        offset: int = 0,
        length: int | None = None,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
        magic: int = c.REQUEST_MAGIC,
    ) -> int:
        """Send one request (``length`` defaults to the payload's); returns its cookie."""
        cookie, raw = self.pack_request(
            kind, offset, length, flags=flags, payload=payload, cookie=cookie, magic=magic
        )
        self.send(raw)
        return cookie

    def pack_request(
        self,
        kind: int,
        offset: int = 0,
        length: int | None = None,
        *,
        flags: int = 0,
        payload: bytes = b"",
        cookie: int | None = None,
        magic: int = c.REQUEST_MAGIC,
    ) -> tuple[int, bytes]:
        """A request's cookie and bytes, to pipeline several in one send."""
        cookie = next(self._cookies) if cookie is None else cookie
        length = len(payload) if length is None else length
        if kind == c.CMD_READ:
            self._read_lengths[cookie] = length
        header = request_header(kind, offset, length, flags=flags, cookie=cookie, magic=magic)
        return cookie, header + payload

    def read_message(self) -> Message:
        """One simple reply (with its READ data) or one structured chunk."""
        (magic,) = struct.unpack(">I", self.recv_exact(4))
        if magic == c.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", self.recv_exact(12))
            is_read = cookie in self._read_lengths
            length = self._read_lengths.pop(cookie, 0)
            assert not (is_read and self.structured), "simple reply to a READ after structured"
            return SimpleReply(cookie, error, self.recv_exact(length) if not error else b"")
        assert magic == c.STRUCTURED_REPLY_MAGIC, f"bad reply magic {magic:#x}"
        assert self.structured, "structured chunk without negotiation"
        flags, kind, cookie, length = struct.unpack(">HHQI", self.recv_exact(16))
        return Chunk(cookie, flags, kind, self.recv_exact(length))

    def read_reply(self) -> Reply:
        """The complete reply of the next request answered (chunks not interleaved)."""
        first = self.read_message()
        if isinstance(first, SimpleReply):
            return Reply(first.cookie, first.error, first.data)
        chunks = [first]
        while not chunks[-1].done:
            nxt = self.read_message()
            assert isinstance(nxt, Chunk), "simple reply inside a structured reply"
            assert nxt.cookie == first.cookie, "interleaved reply"
            chunks.append(nxt)
        self._read_lengths.pop(first.cookie, None)
        return _assemble(first.cookie, chunks)

    def request(self, kind: int, offset: int = 0, length: int = 0, *, flags: int = 0) -> Reply:
        """Send one request without payload and read its reply."""
        cookie = self.send_request(kind, offset, length, flags=flags)
        reply = self.read_reply()
        assert reply.cookie == cookie, f"reply for {reply.cookie}, expected {cookie}"
        return reply

    def read(self, offset: int, length: int, flags: int = 0) -> Reply:
        """READ; a successful structured reply must cover exactly the range asked for."""
        reply = self.request(c.CMD_READ, offset, length, flags=flags)
        if not reply.simple and not reply.error and length:
            assert (reply.offset, len(reply.data)) == (offset, length), "chunks miss the range"
        return reply

    def write(self, offset: int, data: bytes, flags: int = 0) -> int:
        cookie = self.send_request(c.CMD_WRITE, offset, flags=flags, payload=data)
        reply = self.read_reply()
        assert reply.cookie == cookie
        assert not reply.chunks
        return reply.error

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC; returns what the server sent before closing."""
        self.send_request(c.CMD_DISC)
        return self.drain_to_eof()


def _assemble(cookie: int, chunks: list[Chunk]) -> Reply:
    """Fold content chunks into ``data`` (holes as zeroes); the first error wins."""
    reply = Reply(cookie, chunks=chunks, simple=False)
    pieces: list[tuple[int, bytes]] = []
    for chunk in chunks:
        if chunk.is_error and not reply.error:
            reply.error = chunk.error()[0]
        elif chunk.type == c.REPLY_TYPE_OFFSET_DATA:
            pieces.append(chunk.offset_data())
        elif chunk.type == c.REPLY_TYPE_OFFSET_HOLE:
            offset, size = chunk.hole()
            pieces.append((offset, bytes(size)))
    pieces.sort(key=lambda piece: piece[0])
    for (offset, data), (following, _) in pairwise(pieces):
        assert offset + len(data) == following, "content chunks overlap or leave a gap"
    reply.data = b"".join(data for _, data in pieces)
    reply.offset = pieces[0][0] if pieces else None
    return reply
