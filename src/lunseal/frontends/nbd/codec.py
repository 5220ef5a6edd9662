"""Sans-I/O NBD server codec: bytes in, events out; builders for bytes back.

The codec never touches a socket.  Feed it with :meth:`ServerCodec.receive_data`
(or, zero-copy, :meth:`get_buffer` + :meth:`buffer_updated` as
``asyncio.BufferedProtocol`` does) and drain :meth:`next_event` until it
returns ``None``.  Framing errors raise :class:`ProtocolError`: the connection
cannot be resynchronised and must be closed.

Phases::

    HANDSHAKE --client flags--> OPTIONS --start_transmission()--> TRANSMISSION
                                   |                                  |
                                   +------ close() / DISC / ABORT ----+--> CLOSED

A WRITE event's ``payload`` is a view into the receive buffer, lent together
with the event's ``lease``: the codec never writes over a buffer while any of
its payloads is out.  Call ``lease.give_back()`` once the payload is no longer
needed (the NBD server does, once the LUN's worker has written it), so the
buffer can be reused; a payload never given back only costs the codec a fresh
buffer the next time it needs room.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from lunseal.errors import ProtocolError
from lunseal.frontends.nbd import constants as c

_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
_OPTION_HEADER = struct.Struct(">QII")
_REQUEST = struct.Struct(">IHHQQI")
_SIMPLE_REPLY = struct.Struct(">IIQ")
_CHUNK_HEADER = struct.Struct(">IHHQI")
_OPTION_REPLY = struct.Struct(">QIII")
_OFFSET = struct.Struct(">Q")

REQUEST_SIZE = _REQUEST.size
SIMPLE_REPLY_SIZE = _SIMPLE_REPLY.size
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size

HANDSHAKE, OPTIONS, TRANSMISSION, CLOSED = "handshake", "options", "transmission", "closed"

_INITIAL_BUFFER = 256 << 10
_MAX_SLACK = 8 << 20
_SHRINK_ABOVE = 16 << 20


@dataclass(slots=True)
class ClientFlags:
    flags: int

    @property
    def no_zeroes(self) -> bool:
        return bool(self.flags & c.FLAG_NO_ZEROES)


@dataclass(slots=True)
class OptionRequest:
    option: int
    data: bytes
    #: Data longer than the codec accepts: it was skipped, not buffered.
    oversize: bool = False


class BufferLease:
    """Counts the WRITE payloads lent out of one receive buffer and not given
    back yet; while any is out, the codec does not write over that buffer."""

    __slots__ = ("out",)

    def __init__(self) -> None:
        self.out = 0

    def give_back(self) -> None:
        self.out -= 1


@dataclass(slots=True)
class Request:
    flags: int
    type: int
    cookie: int
    offset: int
    length: int
    payload: memoryview | None = None
    #: A WRITE longer than the codec accepts: its payload is skipped, not buffered.
    oversize: bool = False
    #: The lease of the buffer ``payload`` points into (see :class:`BufferLease`).
    lease: BufferLease | None = None


Event = ClientFlags | OptionRequest | Request


class ServerCodec:
    def __init__(self, *, max_payload: int = c.MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self.phase = HANDSHAKE
        self.options_seen = 0
        self._buf = bytearray(_INITIAL_BUFFER)
        self._lease = BufferLease()
        #: The previous buffer: reused once all its payloads are given back, so
        #: a stream of writes alternates between two buffers instead of allocating.
        self._spare: tuple[bytearray, BufferLease] | None = None
        self._start = 0  # first unparsed byte
        self._end = 0  # end of received bytes
        self._skip = 0  # payload bytes of an oversize WRITE or option still to discard
        #: The oversize message being skipped: reported only once its payload is gone,
        #: since a reply sent before the client finished sending it confuses clients.
        self._skipped: OptionRequest | Request | None = None

    # -- input ----------------------------------------------------------------

    def greeting(self) -> bytes:
        return struct.pack(">QQH", c.NBDMAGIC, c.IHAVEOPT, c.SERVER_HANDSHAKE_FLAGS)

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        """Free space to receive into (``asyncio.BufferedProtocol.get_buffer``)."""
        need = max(sizehint, 64 << 10)
        if self._start == self._end and len(self._buf) > _SHRINK_ABOVE:
            # Idle after a huge frame: give the memory back (lent payloads keep
            # the old buffer alive until they are done with it).
            self._buf, self._lease = bytearray(_INITIAL_BUFFER), BufferLease()
            self._spare = None
            self._start = self._end = 0
        if len(self._buf) - self._end < need:
            self._compact(need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes
        self._discard_skipped()

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Copying input path, for tests and non-buffered transports."""
        view = memoryview(data)
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    def _compact(self, need: int) -> None:
        pending = self._end - self._start
        want = max(_INITIAL_BUFFER, pending + need)
        # Room for a few frames of this size, so compaction (a memmove of the
        # partial frame at the tail) happens once per few frames; the slack is
        # bounded and a buffer grown for a rare huge WRITE is given back.
        target = want + min(3 * need, _MAX_SLACK)
        limit = max(target, _SHRINK_ABOVE)
        if want <= len(self._buf) <= limit and not self._lease.out:
            if pending:
                self._buf[:pending] = self._buf[self._start : self._end]
        else:
            # A new size, or payloads of this buffer are still out: move the
            # unparsed bytes to another buffer rather than over theirs.
            spare = self._spare
            if spare is not None and not spare[1].out and want <= len(spare[0]) <= limit:
                new, lease = spare
            else:
                size = len(self._buf) if want <= len(self._buf) <= limit else target
                new, lease = bytearray(size), BufferLease()
            new[:pending] = self._buf[self._start : self._end]
            old = (self._buf, self._lease)
            self._spare = old if want <= len(old[0]) <= limit else None
            self._buf, self._lease = new, lease
        self._start, self._end = 0, pending

    def _discard_skipped(self) -> None:
        if self._skip:
            n = min(self._skip, self._end - self._start)
            self._start += n
            self._skip -= n
        if self._start == self._end and not self._lease.out:
            self._start = self._end = 0

    @property
    def capacity(self) -> int:
        """Bytes the receive buffer holds now (bounded: see ``_compact``)."""
        return len(self._buf)

    @property
    def pending_bytes(self) -> int:
        return self._end - self._start

    # -- events ---------------------------------------------------------------

    def next_event(self) -> Event | None:
        """The next complete event, or ``None`` if more bytes are needed."""
        if self._skip:
            self._discard_skipped()
            if self._skip:
                return None
        if self._skipped is not None:
            event, self._skipped = self._skipped, None
            return event
        if self.phase == TRANSMISSION:
            return self._next_request()
        if self.phase == OPTIONS:
            return self._next_option()
        if self.phase == HANDSHAKE:
            return self._next_client_flags()
        if self._end > self._start:
            raise ProtocolError("data received after the connection was closed")
        return None

    def _next_client_flags(self) -> ClientFlags | None:
        if self._end - self._start < 4:
            return None
        (flags,) = _U32.unpack_from(self._buf, self._start)
        self._start += 4
        if flags & ~c.SERVER_HANDSHAKE_FLAGS:
            raise ProtocolError(f"client sent unknown handshake flags {flags:#x}")
        if not flags & c.FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("client does not support fixed newstyle negotiation")
        self.phase = OPTIONS
        return ClientFlags(flags)

    def _next_option(self) -> OptionRequest | None:
        if self._end - self._start < _OPTION_HEADER.size:
            return None
        magic, option, length = _OPTION_HEADER.unpack_from(self._buf, self._start)
        if magic != c.IHAVEOPT:
            raise ProtocolError(f"bad option magic {magic:#x}")
        if length > c.MAX_OPTION_DATA:
            return self._skip_option(option, length)
        total = _OPTION_HEADER.size + length
        if self._end - self._start < total:
            return None
        self._count_option()
        data = bytes(self._buf[self._start + _OPTION_HEADER.size : self._start + total])
        self._start += total
        return OptionRequest(option, data)

    def _count_option(self) -> None:
        self.options_seen += 1
        if self.options_seen > c.MAX_OPTIONS:
            raise ProtocolError("too many options in negotiation")

    def _skip_option(self, option: int, length: int) -> OptionRequest | None:
        # Too big to be legitimate, yet small enough to skip: discard it and
        # let the negotiator refuse it, so the client can carry on.
        if length > c.MAX_OPTION_SKIP:
            raise ProtocolError(f"option {option} carries {length} bytes, over the limit")
        self._count_option()
        event = OptionRequest(option, b"", True)
        return event if self._start_skip(_OPTION_HEADER.size, length, event) else None

    def _start_skip(self, header: int, length: int, event: OptionRequest | Request) -> bool:
        """Skip a message's data; True if it is gone already, else ``event`` waits for it."""
        self._start += header
        self._skip = length
        self._discard_skipped()
        if self._skip:
            self._skipped = event
            return False
        return True

    def _next_request(self) -> Request | None:
        start = self._start
        if self._end - start < REQUEST_SIZE:
            return None
        magic, flags, kind, cookie, offset, length = _REQUEST.unpack_from(self._buf, start)
        if magic != c.REQUEST_MAGIC:
            raise ProtocolError(f"bad request magic {magic:#x}")
        if kind != c.CMD_WRITE:
            self._start = start + REQUEST_SIZE
            return Request(flags, kind, cookie, offset, length)
        if length > self.max_payload:
            # Keep the stream in sync without buffering the payload; the
            # error reply waits until the whole payload has been read.
            if length > c.MAX_WRITE_SKIP:
                raise ProtocolError(f"write of {length} bytes is far over the limit")
            req = Request(flags, kind, cookie, offset, length, None, True)
            return req if self._start_skip(REQUEST_SIZE, length, req) else None
        end = start + REQUEST_SIZE + length
        if self._end < end:
            if len(self._buf) - start < REQUEST_SIZE + length:
                self._compact(REQUEST_SIZE + length)
            return None
        self._start = end
        payload = memoryview(self._buf)[end - length : end]
        lease = self._lease
        lease.out += 1
        return Request(flags, kind, cookie, offset, length, payload, False, lease)

    # -- phase changes --------------------------------------------------------

    def start_transmission(self) -> None:
        if self.phase != OPTIONS:
            raise ProtocolError(f"cannot start transmission from phase {self.phase}")
        self.phase = TRANSMISSION

    def close(self) -> None:
        self.phase = CLOSED


# -- builders (server -> client) ---------------------------------------------


def _capped(text: str) -> bytes:
    """``text`` as UTF-8, cut to the protocol's string limit on a character boundary."""
    raw = text.encode()
    if len(raw) <= c.MAX_STRING:
        return raw
    return raw[: c.MAX_STRING].decode(errors="ignore").encode()


def option_reply(option: int, reply_type: int, data: bytes = b"") -> bytes:
    return _OPTION_REPLY.pack(c.OPTION_REPLY_MAGIC, option, reply_type, len(data)) + data


def option_error(option: int, reply_type: int, message: str) -> bytes:
    return option_reply(option, reply_type, _capped(message))


def export_name_reply(size: int, tflags: int, *, no_zeroes: bool) -> bytes:
    return struct.pack(">QH", size, tflags) + (b"" if no_zeroes else bytes(124))


def info_export(size: int, tflags: int) -> bytes:
    return struct.pack(">HQH", c.INFO_EXPORT, size, tflags)


def info_name(name: str) -> bytes:
    return _U16.pack(c.INFO_NAME) + name.encode()


def info_description(text: str) -> bytes:
    return _U16.pack(c.INFO_DESCRIPTION) + _capped(text)


def info_block_size(minimum: int, preferred: int, maximum: int) -> bytes:
    return struct.pack(">HIII", c.INFO_BLOCK_SIZE, minimum, preferred, maximum)


def server_entry(name: str, description: str = "") -> bytes:
    raw = name.encode()
    return _U32.pack(len(raw)) + raw + _capped(description)


def meta_context_entry(context_id: int, name: str) -> bytes:
    return _U32.pack(context_id) + name.encode()


def simple_reply(cookie: int, error: int = 0) -> bytes:
    return _SIMPLE_REPLY.pack(c.SIMPLE_REPLY_MAGIC, error, cookie)


def chunk_header(flags: int, kind: int, cookie: int, length: int) -> bytes:
    return _CHUNK_HEADER.pack(c.STRUCTURED_REPLY_MAGIC, flags, kind, cookie, length)


def data_chunk_header(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    """Header of an OFFSET_DATA chunk; ``length`` bytes of data follow it."""
    flags = c.REPLY_FLAG_DONE if done else 0
    return chunk_header(flags, c.REPLY_TYPE_OFFSET_DATA, cookie, 8 + length) + _OFFSET.pack(offset)


def hole_chunk(cookie: int, offset: int, length: int, *, done: bool) -> bytes:
    flags = c.REPLY_FLAG_DONE if done else 0
    header = chunk_header(flags, c.REPLY_TYPE_OFFSET_HOLE, cookie, 12)
    return header + struct.pack(">QI", offset, length)


def none_chunk(cookie: int) -> bytes:
    return chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_NONE, cookie, 0)


def error_chunk(cookie: int, error: int, message: str = "") -> bytes:
    raw = _capped(message)
    body = struct.pack(">IH", error, len(raw)) + raw
    return chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_ERROR, cookie, len(body)) + body


def block_status_chunk(cookie: int, context_id: int, extents: list[tuple[int, int]]) -> bytes:
    body = _U32.pack(context_id) + b"".join(struct.pack(">II", n, f) for n, f in extents)
    return chunk_header(c.REPLY_FLAG_DONE, c.REPLY_TYPE_BLOCK_STATUS, cookie, len(body)) + body


# -- option payload parsers ---------------------------------------------------


class OptionDataError(Exception):
    """Option data that does not parse: answered with NBD_REP_ERR_INVALID."""


def _take_string(data: bytes, pos: int, what: str) -> tuple[str, int]:
    if len(data) < pos + 4:
        raise OptionDataError(f"{what}: length field missing")
    (n,) = _U32.unpack_from(data, pos)
    pos += 4
    if n > c.MAX_STRING or len(data) < pos + n:
        raise OptionDataError(f"{what}: bad length {n}")
    raw = data[pos : pos + n]
    if b"\0" in raw:
        raise OptionDataError(f"{what}: contains NUL")
    try:
        return raw.decode(), pos + n
    except UnicodeDecodeError:
        raise OptionDataError(f"{what}: not UTF-8") from None


def parse_info_request(data: bytes) -> tuple[str, list[int]]:
    """INFO/GO data: export name and the requested info types."""
    name, pos = _take_string(data, 0, "export name")
    if len(data) < pos + 2:
        raise OptionDataError("info request count missing")
    (count,) = _U16.unpack_from(data, pos)
    pos += 2
    if len(data) != pos + 2 * count:
        raise OptionDataError("info request list length does not match its count")
    return name, [_U16.unpack_from(data, pos + 2 * i)[0] for i in range(count)]


def parse_meta_context_request(data: bytes) -> tuple[str, list[str]]:
    """LIST/SET_META_CONTEXT data: export name and the context queries."""
    name, pos = _take_string(data, 0, "export name")
    if len(data) < pos + 4:
        raise OptionDataError("query count missing")
    (count,) = _U32.unpack_from(data, pos)
    pos += 4
    queries = []
    for _ in range(count):
        query, pos = _take_string(data, pos, "query")
        queries.append(query)
    if pos != len(data):
        raise OptionDataError("trailing bytes after the queries")
    return name, queries


def parse_export_name(data: bytes) -> str:
    if len(data) > c.MAX_STRING or b"\0" in data:
        raise OptionDataError("bad export name")
    try:
        return data.decode()
    except UnicodeDecodeError:
        raise OptionDataError("export name is not UTF-8") from None
