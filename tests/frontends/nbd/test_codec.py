"""The sans-I/O codec: every client message in every split, errors, builders, parsers.

Field values below are written out from the protocol document on purpose
(not taken from ``lunseal.frontends.nbd.constants``), so a wrong constant fails here.
"""

from __future__ import annotations

import struct
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

from lunseal.errors import ProtocolError
from lunseal.frontends.nbd import codec
from lunseal.frontends.nbd.codec import ClientFlags, Event, OptionRequest, Request, ServerCodec
from tests.support.nbdclient import (
    info_request,
    meta_context_request,
    option_header,
    request_header,
)

IHAVEOPT = 0x49484156454F5054
MiB = 1 << 20
MAX_PAYLOAD = 32 * MiB

Snapshot = tuple[object, ...]
Feeder = Callable[[ServerCodec, bytes], list[Snapshot]]


# -- feeding ----------------------------------------------------------------------


def snapshot(event: Event) -> Snapshot:
    """A comparable copy of an event (a WRITE payload is only valid until the next feed)."""
    if isinstance(event, ClientFlags):
        return ("flags", event.flags)
    if isinstance(event, OptionRequest):
        extra = ("oversize",) if event.oversize else ()
        return ("option", event.option, event.data, *extra)
    payload = None if event.payload is None else bytes(event.payload)
    fields = (event.flags, event.type, event.cookie, event.offset, event.length)
    return ("request", *fields, payload, event.oversize)


def drain(conn: ServerCodec) -> Iterator[Snapshot]:
    while (event := conn.next_event()) is not None:
        yield snapshot(event)


def feed_whole(conn: ServerCodec, data: bytes) -> list[Snapshot]:
    conn.receive_data(data)
    return list(drain(conn))


def feed_bytewise(conn: ServerCodec, data: bytes) -> list[Snapshot]:
    events: list[Snapshot] = []
    for i in range(len(data)):
        conn.receive_data(data[i : i + 1])
        events += drain(conn)
    return events


def feed_zero_copy(conn: ServerCodec, data: bytes, step: int = 7) -> list[Snapshot]:
    """The asyncio.BufferedProtocol path: get_buffer + buffer_updated, odd-sized pieces."""
    events: list[Snapshot] = []
    for pos in range(0, len(data), step):
        piece = data[pos : pos + step]
        buf = conn.get_buffer(len(piece))
        buf[: len(piece)] = piece
        del buf
        conn.buffer_updated(len(piece))
        events += drain(conn)
    return events


FEEDERS = [
    pytest.param(feed_whole, id="whole"),
    pytest.param(feed_bytewise, id="bytewise"),
    pytest.param(feed_zero_copy, id="zero-copy"),
]


def codec_in(phase: str, **kw: int) -> ServerCodec:
    conn = ServerCodec(**kw)
    if phase in ("options", "transmission"):
        assert feed_whole(conn, struct.pack(">I", 1)) == [("flags", 1)]
    if phase == "transmission":
        conn.start_transmission()
    return conn


# -- the message table ------------------------------------------------------------------


def option(number: int, data: bytes = b"") -> bytes:
    return option_header(number, len(data)) + data


def request(
    kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7, data: bytes = b""
) -> bytes:
    return request_header(kind, offset, length, flags=flags, cookie=cookie) + data


def req_event(
    kind: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 7
) -> Snapshot:
    return ("request", flags, kind, cookie, offset, length, None, False)


def write_event(offset: int, data: bytes, flags: int = 0, cookie: int = 7) -> Snapshot:
    return ("request", flags, 1, cookie, offset, len(data), data, False)


BIG = bytes(range(256)) * 1200  # 300 KiB: more than the codec's initial buffer
QUERIES = meta_context_request("disk", ("base:allocation", "qemu:dirty-bitmap:x"))

HANDSHAKE_MESSAGES = [
    pytest.param(struct.pack(">I", 1), [("flags", 1)], id="fixed-newstyle"),
    pytest.param(struct.pack(">I", 3), [("flags", 3)], id="fixed-newstyle+no-zeroes"),
]

OPTION_MESSAGES = [
    pytest.param(option(1, b"disk"), [("option", 1, b"disk")], id="EXPORT_NAME"),
    pytest.param(option(1), [("option", 1, b"")], id="EXPORT_NAME-default"),
    pytest.param(option(2), [("option", 2, b"")], id="ABORT"),
    pytest.param(option(3), [("option", 3, b"")], id="LIST"),
    pytest.param(option(5), [("option", 5, b"")], id="STARTTLS"),
    pytest.param(
        option(6, info_request("disk", (1, 2, 3))),
        [("option", 6, info_request("disk", (1, 2, 3)))],
        id="INFO",
    ),
    pytest.param(option(7, info_request("")), [("option", 7, info_request(""))], id="GO"),
    pytest.param(option(8), [("option", 8, b"")], id="STRUCTURED_REPLY"),
    pytest.param(option(9, QUERIES), [("option", 9, QUERIES)], id="LIST_META_CONTEXT"),
    pytest.param(option(10, QUERIES), [("option", 10, QUERIES)], id="SET_META_CONTEXT"),
    pytest.param(option(0xBEEF, b"xyz"), [("option", 0xBEEF, b"xyz")], id="unknown"),
    pytest.param(
        option(3, b"\xab" * (64 << 10)), [("option", 3, b"\xab" * (64 << 10))], id="max-data"
    ),
]

REQUEST_MESSAGES = [
    pytest.param(request(0, 4096, 512), [req_event(0, 4096, 512)], id="READ"),
    pytest.param(
        request(0, 0, 65536, flags=4, cookie=2**64 - 1),
        [req_event(0, 0, 65536, flags=4, cookie=2**64 - 1)],
        id="READ-DF-max-cookie",
    ),
    pytest.param(
        request(1, 512, 5, flags=1, data=b"hello"),
        [write_event(512, b"hello", flags=1)],
        id="WRITE-FUA",
    ),
    pytest.param(request(1, 8), [write_event(8, b"")], id="WRITE-empty"),
    pytest.param(request(1, 2**63, len(BIG), data=BIG), [write_event(2**63, BIG)], id="WRITE-300K"),
    pytest.param(request(2), [req_event(2)], id="DISC"),
    pytest.param(request(3), [req_event(3)], id="FLUSH"),
    pytest.param(request(4, 0, 1 << 30, flags=1), [req_event(4, 0, 1 << 30, 1)], id="TRIM"),
    pytest.param(request(5, 1, 2), [req_event(5, 1, 2)], id="CACHE"),
    pytest.param(
        request(6, 4096, 2**32 - 1, flags=0x13), [req_event(6, 4096, 2**32 - 1, 0x13)], id="ZERO"
    ),
    pytest.param(request(7, 0, 1 << 20, flags=8), [req_event(7, 0, 1 << 20, 8)], id="BLOCK_STATUS"),
    pytest.param(request(99, 2**64 - 1, 7), [req_event(99, 2**64 - 1, 7)], id="unknown-command"),
]

#: What follows each message in the "trailing bytes" variant, and its event.
NEXT: dict[str, tuple[bytes, list[Snapshot]]] = {
    "handshake": (option(3), [("option", 3, b"")]),
    "options": (option(8), [("option", 8, b"")]),
    "transmission": (request(3, cookie=99), [req_event(3, cookie=99)]),
}


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "events"), HANDSHAKE_MESSAGES)
def test_client_flags(feed: Feeder, data: bytes, events: list[Snapshot]) -> None:
    assert_same_events("handshake", feed, data, events)


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "events"), OPTION_MESSAGES)
def test_options(feed: Feeder, data: bytes, events: list[Snapshot]) -> None:
    assert_same_events("options", feed, data, events)


@pytest.mark.parametrize("feed", FEEDERS)
@pytest.mark.parametrize(("data", "events"), REQUEST_MESSAGES)
def test_requests(feed: Feeder, data: bytes, events: list[Snapshot]) -> None:
    assert_same_events("transmission", feed, data, events)


def assert_same_events(phase: str, feed: Feeder, data: bytes, events: list[Snapshot]) -> None:
    conn = codec_in(phase)
    assert feed(conn, data) == events
    assert conn.pending_bytes == 0
    assert conn.next_event() is None
    trailing, next_events = NEXT[phase]
    assert feed(codec_in(phase), data + trailing) == events + next_events


@pytest.mark.parametrize("feed", FEEDERS)
def test_incomplete_message_yields_nothing(feed: Feeder) -> None:
    data = request(1, 0, 5, data=b"hello")
    conn = codec_in("transmission")
    assert feed(conn, data[:-1]) == []
    assert conn.pending_bytes == len(data) - 1
    assert feed(conn, data[-1:]) == [write_event(0, b"hello")]


def test_no_zeroes_flag_is_reported() -> None:
    conn = ServerCodec()
    conn.receive_data(struct.pack(">I", 3))
    event = conn.next_event()
    assert isinstance(event, ClientFlags)
    assert event.no_zeroes
    conn = ServerCodec()
    conn.receive_data(struct.pack(">I", 1))
    event = conn.next_event()
    assert isinstance(event, ClientFlags)
    assert not event.no_zeroes


def test_requests_pipelined_after_go_parse_once_transmission_starts() -> None:
    """A client may send requests right behind GO; the caller switches phase in between."""
    conn = codec_in("options")
    conn.receive_data(option(7, info_request("")) + request(0, 0, 512))
    assert snapshot(next_event(conn)) == ("option", 7, info_request(""))
    conn.start_transmission()
    assert snapshot(next_event(conn)) == req_event(0, 0, 512)


def test_write_payload_is_a_view_valid_until_the_next_feed() -> None:
    conn = codec_in("transmission")
    conn.receive_data(request(1, 0, 3, data=b"abc"))
    event = next_event(conn)
    assert isinstance(event, Request)
    assert isinstance(event.payload, memoryview)
    assert bytes(event.payload) == b"abc"


def test_a_lent_payload_is_never_written_over_until_given_back() -> None:
    """The worker writes a payload straight from the receive buffer: however much
    the codec receives meanwhile (compacting, growing), a payload that is still
    out keeps its bytes."""
    conn = codec_in("transmission")
    first = bytes(range(256)) * 192  # 48 KiB
    conn.receive_data(request(1, 0, len(first), data=first))
    kept = next_event(conn)
    assert isinstance(kept, Request)
    assert kept.payload is not None
    assert kept.lease is not None
    for i in range(200):  # ~10 MiB more: the buffer is compacted, then grown
        size = 48 * 1024 if i < 150 else 300 * 1024
        conn.receive_data(request(1, 0, size, data=bytes([i % 251]) * size))
        event = next_event(conn)
        assert isinstance(event, Request)
        assert event.lease is not None
        event.lease.give_back()
    assert bytes(kept.payload) == first


def test_receive_buffers_are_reused_once_their_payloads_are_back() -> None:
    """A stream of writes whose payloads are given back alternates between two
    buffers instead of allocating one per refill."""
    conn = codec_in("transmission")
    buffers: dict[int, object] = {}  # kept alive, so no id is reused
    held: list[Request] = []
    for i in range(3000):
        conn.receive_data(request(1, 0, 4096, data=bytes([i % 251]) * 4096))
        event = next_event(conn)
        assert isinstance(event, Request)
        assert event.payload is not None
        buffers[id(event.payload.obj)] = event.payload.obj
        held.append(event)
        if len(held) > 8:  # a few batches in flight, as with a busy worker
            done = held.pop(0)
            assert done.lease is not None
            done.lease.give_back()
    assert len(buffers) <= 3
    assert conn.capacity <= 1 * MiB


def next_event(conn: ServerCodec) -> Event:
    event = conn.next_event()
    assert event is not None
    return event


# -- framing errors -----------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        pytest.param(0, id="no-fixed-newstyle"),
        pytest.param(2, id="no-zeroes-only"),
        pytest.param(5, id="unknown-bit-2"),
        pytest.param(0x80000001, id="unknown-bit-31"),
    ],
)
def test_bad_client_flags_are_a_protocol_error(flags: int) -> None:
    assert_error_at_last_byte("handshake", struct.pack(">I", flags))


def test_bad_option_magic_is_detected_from_the_header_alone() -> None:
    assert_error_at_last_byte("options", option_header(3, 0, magic=IHAVEOPT + 1))


@pytest.mark.parametrize("length", [(16 << 20) + 1, 2**32 - 1])
def test_absurd_option_data_is_refused_before_it_arrives(length: int) -> None:
    assert_error_at_last_byte("options", option_header(3, length))


@pytest.mark.parametrize("feed", FEEDERS)
def test_oversize_option_data_is_skipped_then_reported(feed: Feeder) -> None:
    """proto.md: NBD_REP_ERR_TOO_BIG exists for this; the client may carry on."""
    length = (64 << 10) + 1
    data = option_header(6, length) + b"\x33" * length + option(8)
    events = feed(codec_in("options"), data)
    assert events == [("option", 6, b"", "oversize"), ("option", 8, b"")]


def test_oversize_option_is_reported_only_after_its_data() -> None:
    conn = codec_in("options")
    length = 1 << 20
    conn.receive_data(option_header(7, length))
    piece = b"\x44" * (64 << 10)
    for _ in range(length // len(piece)):
        assert conn.next_event() is None
        conn.receive_data(piece)
        assert conn.pending_bytes == 0  # skipped, never buffered
    assert snapshot(next_event(conn)) == ("option", 7, b"", "oversize")


@pytest.mark.parametrize(
    "magic",
    [
        pytest.param(0x25609514, id="off-by-one"),
        pytest.param(0x67446698, id="simple-reply-magic"),
        pytest.param(0, id="zero"),
    ],
)
def test_bad_request_magic_is_a_protocol_error(magic: int) -> None:
    assert_error_at_last_byte("transmission", request_header(0, 0, 512, magic=magic))


def assert_error_at_last_byte(phase: str, data: bytes) -> None:
    """Nothing happens until the frame header is complete; then ProtocolError."""
    conn = codec_in(phase)
    for i in range(len(data) - 1):
        conn.receive_data(data[i : i + 1])
        assert conn.next_event() is None
    conn.receive_data(data[-1:])
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_too_many_options_is_a_protocol_error() -> None:
    conn = codec_in("options")
    conn.receive_data(option(0xBEEF) * 256)
    assert len(list(drain(conn))) == 256
    conn.receive_data(option(0xBEEF))
    with pytest.raises(ProtocolError):
        conn.next_event()


def test_data_after_close_is_a_protocol_error() -> None:
    conn = codec_in("transmission")
    conn.close()
    assert conn.next_event() is None
    conn.receive_data(request(0, 0, 512))
    with pytest.raises(ProtocolError):
        conn.next_event()


@pytest.mark.parametrize("phase", ["handshake", "transmission"])
def test_transmission_starts_only_from_options(phase: str) -> None:
    with pytest.raises(ProtocolError):
        codec_in(phase).start_transmission()


# -- oversize WRITE ------------------------------------------------------------------


@pytest.mark.parametrize("feed", FEEDERS)
def test_oversize_write_is_skipped_and_the_stream_stays_in_sync(feed: Feeder) -> None:
    payload = b"\x5a" * 1001
    data = request(1, 0, 1001, data=payload) + request(0, 0, 8, cookie=8)
    events = feed(codec_in("transmission", max_payload=1000), data)
    assert events == [
        ("request", 0, 1, 7, 0, 1001, None, True),
        req_event(0, 0, 8, cookie=8),
    ]


def test_write_of_exactly_max_payload_is_delivered() -> None:
    payload = bytes(range(250)) * 4
    conn = codec_in("transmission", max_payload=1000)
    assert feed_whole(conn, request(1, 0, 1000, data=payload)) == [write_event(0, payload)]


def test_oversize_write_event_comes_after_its_payload() -> None:
    """An error reply sent while the client is still sending the payload makes
    libnbd declare the connection dead: the event waits for the last byte."""
    conn = codec_in("transmission")
    length = MAX_PAYLOAD + 1
    conn.receive_data(request_header(1, 0, length, cookie=5))
    assert conn.next_event() is None
    conn.receive_data(bytes(length - 1))
    assert conn.next_event() is None
    conn.receive_data(b"\x00")
    event = next_event(conn)
    assert isinstance(event, Request)
    assert event.oversize
    assert event.payload is None
    assert event.cookie == 5


def test_oversize_write_payload_is_never_buffered() -> None:
    conn = codec_in("transmission")
    length = MAX_PAYLOAD + 1
    conn.receive_data(request_header(1, 0, length, cookie=5))
    piece = b"\xee" * (64 << 10)
    tracemalloc.start()
    try:
        left = length
        while left:
            assert conn.next_event() is None
            n = min(left, len(piece))
            conn.receive_data(piece[:n] if n < len(piece) else piece)
            assert conn.pending_bytes == 0
            left -= n
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * MiB
    assert snapshot(next_event(conn)) == ("request", 0, 1, 5, 0, length, None, True)
    conn.receive_data(request(3, cookie=6))
    assert snapshot(next_event(conn)) == req_event(3, cookie=6)


def test_absurd_write_length_is_a_protocol_error() -> None:
    assert_error_at_last_byte("transmission", request_header(1, 0, 2**32 - 1))


# -- builders ----------------------------------------------------------------------


def test_greeting() -> None:
    assert ServerCodec().greeting() == bytes.fromhex("4e42444d41474943 49484156454f5054 0003")


def test_option_reply() -> None:
    raw = codec.option_reply(6, 3, b"abc")
    assert raw == bytes.fromhex("0003e889045565a9 00000006 00000003 00000003") + b"abc"
    assert codec.option_reply(3, 1) == bytes.fromhex("0003e889045565a9 00000003 00000001 00000000")


def test_option_error_carries_its_message() -> None:
    raw = codec.option_error(7, 0x80000006, "no such export")
    assert raw[:20] == struct.pack(">QIII", 0x3E889045565A9, 7, 0x80000006, 14)
    assert raw[20:] == b"no such export"


@pytest.mark.parametrize("text", ["x" * 5000, "a" + "é" * 3000, "ab" + "€" * 2000, "🙂" * 1500])
def test_messages_are_capped_at_4096_bytes_of_valid_utf8(text: str) -> None:
    raw = codec.option_error(7, 0x80000006, text)
    (length,) = struct.unpack_from(">I", raw, 16)
    message = raw[20:]
    assert len(message) == length <= 4096
    assert text.startswith(message.decode())
    assert length > 4090
    chunk = codec.error_chunk(9, 22, text)
    (n,) = struct.unpack_from(">H", chunk, 24)
    assert n <= 4096
    assert text.startswith(chunk[26:].decode())


@pytest.mark.parametrize(
    ("no_zeroes", "length"), [pytest.param(True, 10, id="no-zeroes"), (False, 134)]
)
def test_export_name_reply(no_zeroes: bool, length: int) -> None:
    raw = codec.export_name_reply(1 << 30, 0x1234, no_zeroes=no_zeroes)
    assert len(raw) == length
    assert raw[:10] == bytes.fromhex("0000000040000000 1234")
    assert raw[10:] == bytes(length - 10)


def test_info_items() -> None:
    assert codec.info_export(4096, 0x0D) == bytes.fromhex("0000 0000000000001000 000d")
    assert codec.info_name("disk") == b"\x00\x01disk"
    assert codec.info_description("a LUN") == b"\x00\x02a LUN"
    block = codec.info_block_size(1, 4096, 32 * MiB)
    assert block == bytes.fromhex("0003 00000001 00001000 02000000")


def test_server_entry_and_meta_context_entry() -> None:
    assert codec.server_entry("disk", "LUN 0") == b"\x00\x00\x00\x04diskLUN 0"
    assert codec.server_entry("d") == b"\x00\x00\x00\x01d"
    entry = codec.meta_context_entry(1, "base:allocation")
    assert entry == b"\x00\x00\x00\x01base:allocation"


def test_simple_reply() -> None:
    raw = codec.simple_reply(0x0102030405060708, 28)
    assert raw == bytes.fromhex("67446698 0000001c 0102030405060708")
    assert codec.simple_reply(1) == bytes.fromhex("67446698 00000000 0000000000000001")


def test_chunk_headers() -> None:
    assert codec.chunk_header(1, 2, 3, 4) == bytes.fromhex(
        "668e33ef 0001 0002 0000000000000003 00000004"
    )
    data = codec.data_chunk_header(5, 4096, 512, done=True)
    assert data == bytes.fromhex("668e33ef 0001 0001 0000000000000005 00000208 0000000000001000")
    assert codec.data_chunk_header(5, 0, 1, done=False)[4:6] == b"\x00\x00"


def test_hole_chunk() -> None:
    raw = codec.hole_chunk(5, 8192, 4096, done=False)
    assert raw == bytes.fromhex(
        "668e33ef 0000 0002 0000000000000005 0000000c 0000000000002000 00001000"
    )
    assert codec.hole_chunk(5, 0, 1, done=True)[4:6] == b"\x00\x01"


def test_none_chunk() -> None:
    assert codec.none_chunk(9) == bytes.fromhex("668e33ef 0001 0000 0000000000000009 00000000")


def test_error_chunk() -> None:
    raw = codec.error_chunk(9, 22, "bad")
    header = bytes.fromhex("668e33ef 0001 8001 0000000000000009 00000009")
    assert raw == header + bytes.fromhex("00000016 0003") + b"bad"
    assert codec.error_chunk(9, 5)[20:] == bytes.fromhex("00000005 0000")


def test_block_status_chunk() -> None:
    raw = codec.block_status_chunk(9, 1, [(4096, 0), (8192, 3)])
    header = bytes.fromhex("668e33ef 0001 0005 0000000000000009 00000014")
    body = bytes.fromhex("00000001 00001000 00000000 00002000 00000003")
    assert raw == header + body


# -- option data parsers -------------------------------------------------------------


def test_parse_info_request() -> None:
    assert codec.parse_info_request(info_request("disk", (1, 3))) == ("disk", [1, 3])
    assert codec.parse_info_request(info_request("")) == ("", [])
    assert codec.parse_info_request(info_request("é")) == ("é", [])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00", id="short-length"),
        pytest.param(b"\x00\x00\x00\x05abc", id="name-truncated"),
        pytest.param(b"\x00\x00\x00\x01a", id="count-missing"),
        pytest.param(b"\x00\x00\x00\x01a\x00", id="count-truncated"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x02\x00\x01", id="too-few-items"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x01\x00\x01\x00", id="trailing-byte"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00\x00\x01", id="items-without-count"),
        pytest.param(b"\x00\x00\x00\x03a\x00b\x00\x00", id="nul-in-name"),
        pytest.param(b"\x00\x00\x00\x02\xc3\x28\x00\x00", id="bad-utf8"),
        pytest.param(struct.pack(">I", 4097) + b"a" * 4097 + b"\x00\x00", id="name-too-long"),
        pytest.param(b"\xff\xff\xff\xff\x00\x00", id="huge-length"),
    ],
)
def test_parse_info_request_rejects(data: bytes) -> None:
    with pytest.raises(codec.OptionDataError):
        codec.parse_info_request(data)


def test_parse_meta_context_request() -> None:
    parse = codec.parse_meta_context_request
    assert parse(meta_context_request("disk", ())) == ("disk", [])
    assert parse(QUERIES) == ("disk", ["base:allocation", "qemu:dirty-bitmap:x"])
    assert parse(meta_context_request("", ("base:",))) == ("", ["base:"])


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00\x01a", id="count-missing"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00\x00\x01", id="query-missing"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00\x00\x01\x00\x00\x00\x05base", id="truncated"),
        pytest.param(meta_context_request("a", ("base:",)) + b"\x00", id="trailing-byte"),
        pytest.param(meta_context_request("a", ("base:\x00",)), id="nul-in-query"),
        pytest.param(meta_context_request("a\x00", ()), id="nul-in-name"),
        pytest.param(b"\x00\x00\x00\x01a\x00\x00\x00\x01\x00\x00\x00\x01\xff", id="bad-utf8"),
        pytest.param(meta_context_request("a", ("x" * 4097,)), id="query-too-long"),
        pytest.param(b"\x00\x00\x00\x00\xff\xff\xff\xff", id="huge-count"),
    ],
)
def test_parse_meta_context_request_rejects(data: bytes) -> None:
    with pytest.raises(codec.OptionDataError):
        codec.parse_meta_context_request(data)


def test_parse_export_name() -> None:
    assert codec.parse_export_name(b"") == ""
    assert codec.parse_export_name("dïsk".encode()) == "dïsk"
    assert codec.parse_export_name(b"a" * 4096) == "a" * 4096


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"a" * 4097, id="too-long"),
        pytest.param(b"a\x00b", id="nul"),
        pytest.param(b"\xc3", id="truncated-utf8"),
        pytest.param(b"\xff\xfe", id="bad-utf8"),
    ],
)
def test_parse_export_name_rejects(data: bytes) -> None:
    with pytest.raises(codec.OptionDataError):
        codec.parse_export_name(data)


def test_receive_buffer_is_given_back_after_a_maximum_size_write() -> None:
    conn = codec_in("transmission")
    conn.receive_data(request(1, length=MAX_PAYLOAD, data=bytes(MAX_PAYLOAD)))
    event = conn.next_event()
    assert isinstance(event, Request)
    assert event.payload is not None
    assert len(event.payload) == MAX_PAYLOAD
    assert conn.capacity <= MAX_PAYLOAD + 9 * MiB  # bounded slack, not several frames
    del event
    conn.get_buffer(4096)
    assert conn.capacity <= 1 * MiB
