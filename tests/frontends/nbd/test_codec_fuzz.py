"""Hypothesis: whatever bytes arrive, in whatever pieces, the codec yields events or
raises ProtocolError -- and the pieces never change which events or error it yields."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

from hypothesis import given, settings
from hypothesis import strategies as st

from lunseal.engine.backends.memory import MemoryBackend
from lunseal.engine.lun import Lun, LunRecord
from lunseal.errors import ProtocolError
from lunseal.frontends.nbd import codec
from lunseal.frontends.nbd.codec import ServerCodec
from lunseal.frontends.nbd.negotiation import Negotiator
from tests.frontends.nbd.test_codec import Snapshot, codec_in, drain
from tests.support.nbdclient import option_header, request_header

FUZZ = settings(max_examples=300, deadline=None)
PHASES = ["handshake", "options", "transmission", "closed"]
#: Small, so that a fuzzed WRITE header cannot make the codec allocate 32 MiB.
MAX_PAYLOAD = 1 << 12

Outcome = tuple[list[Snapshot], bool]


def make_codec(phase: str) -> ServerCodec:
    conn = codec_in("options" if phase == "closed" else phase, max_payload=MAX_PAYLOAD)
    if phase == "closed":
        conn.close()
    return conn


def run(phase: str, pieces: list[bytes]) -> Outcome:
    """Feed the pieces, draining after each; (events, whether ProtocolError was raised)."""
    conn = make_codec(phase)
    events: list[Snapshot] = []
    try:
        for piece in pieces:
            conn.receive_data(piece)
            events.extend(drain(conn))
    except ProtocolError:
        return events, True
    return events, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- inputs: raw noise, and noise built from plausible frames ------------------------

u16, u32, u64 = (st.integers(0, 2**bits - 1) for bits in (16, 32, 64))
OPTION_MAGICS = [0x49484156454F5054] * 5 + [0]
REQUEST_MAGICS = [0x25609513] * 5 + [0x67446698]


@st.composite
def option_frame(draw: st.DrawFn) -> bytes:
    data = draw(st.binary(max_size=64))
    length = draw(st.sampled_from([len(data)] * 4 + [draw(u32)]))
    magic = draw(st.sampled_from(OPTION_MAGICS))
    return option_header(draw(st.integers(0, 12)), length, magic=magic) + data


@st.composite
def request_frame(draw: st.DrawFn) -> bytes:
    """Mostly well-framed requests; WRITEs carry their payload (or not quite)."""
    kind = draw(st.one_of(st.integers(0, 8), st.integers(1, 1), u16))
    length = draw(
        st.one_of(st.integers(0, 300), st.integers(MAX_PAYLOAD + 1, 2 * MAX_PAYLOAD), u32)
    )
    fields = {"flags": draw(u16), "cookie": draw(u64)}
    header = request_header(
        kind, draw(u64), length, **fields, magic=draw(st.sampled_from(REQUEST_MAGICS))
    )
    if kind != 1:
        return header
    payload = bytes([kind]) * min(length, 300)
    return header + payload[: draw(st.sampled_from([len(payload)] * 4 + [len(payload) // 2]))]


client_flags = st.sampled_from([struct.pack(">I", f) for f in (1, 3, 1, 3, 0, 4)])
noise = st.binary(min_size=1, max_size=8)
FRAMES = {
    "handshake": option_frame(),
    "options": option_frame(),
    "transmission": request_frame(),
    "closed": st.one_of(option_frame(), request_frame()),
}


def stream_for(phase: str) -> st.SearchStrategy[bytes]:
    """Raw noise, or a run of frames of the phase with the odd noise between them."""
    first = client_flags if phase == "handshake" else st.just(b"")
    frames = st.lists(st.one_of(FRAMES[phase], FRAMES[phase], FRAMES[phase], noise), max_size=10)
    framed = st.tuples(first, frames).map(lambda t: t[0] + b"".join(t[1]))
    return st.one_of(st.binary(max_size=600), framed)


phase_and_stream = st.sampled_from(PHASES).flatmap(
    lambda phase: st.tuples(st.just(phase), stream_for(phase))
)
cuts = st.lists(st.integers(0, 4000), max_size=40)


@FUZZ
@given(phase_and_stream, cuts)
def test_any_split_gives_the_same_events_or_error(case: tuple[str, bytes], at: list[int]) -> None:
    phase, data = case
    whole = run(phase, [data])
    assert run(phase, split(data, at)) == whole
    if phase == "closed":
        assert whole == ([], bool(data))


@FUZZ
@given(phase_and_stream)
def test_bytewise_gives_the_same_events_or_error(case: tuple[str, bytes]) -> None:
    phase, data = case
    pieces = [data[i : i + 1] for i in range(len(data))]
    assert run(phase, pieces) == run(phase, [data])


@FUZZ
@given(stream_for("transmission"), st.lists(st.integers(1, 97), min_size=1, max_size=8))
def test_zero_copy_path_matches_receive_data(data: bytes, steps: list[int]) -> None:
    """The BufferedProtocol path with varying piece sizes (transmission phase)."""
    conn = make_codec("transmission")
    events: list[Snapshot] = []
    failed = False
    pos, i = 0, 0
    try:
        while pos < len(data):
            piece = data[pos : pos + steps[i % len(steps)]]
            buf = conn.get_buffer(len(piece))
            buf[: len(piece)] = piece
            del buf
            conn.buffer_updated(len(piece))
            events.extend(drain(conn))
            pos, i = pos + len(piece), i + 1
    except ProtocolError:
        failed = True
    assert (events, failed) == run("transmission", [data])


# -- option data: parsers and the negotiator never raise anything else --------------------


PARSERS: list[Callable[[bytes], object]] = [
    codec.parse_info_request,
    codec.parse_meta_context_request,
    codec.parse_export_name,
]


@FUZZ
@given(st.binary(max_size=300))
def test_option_parsers_only_raise_option_data_error(data: bytes) -> None:
    for parse in PARSERS:
        with contextlib.suppress(codec.OptionDataError):
            parse(data)


def memory_lun(name: str, number: int) -> Lun:
    record = LunRecord(
        uuid=f"uuid-{name}",
        name=name,
        number=number,
        size=1 << 20,
        backend="memory",
        path="",
        owned=True,
        read_only=False,
        created_at=0.0,
    )
    return Lun(record, MemoryBackend(record.size))


LUNS = {"": memory_lun("a", 0), "a": memory_lun("a", 0), "b": memory_lun("b", 1)}


@FUZZ
@given(st.lists(st.tuples(st.integers(0, 12), st.binary(max_size=80)), max_size=10))
def test_negotiator_answers_every_option_with_well_formed_replies(
    options: list[tuple[int, bytes]],
) -> None:
    neg = Negotiator(resolve=LUNS.get, list_exports=lambda: [LUNS["a"], LUNS["b"]])
    for number, data in options:
        out = neg.handle(number, data)
        if number == 1 and out.replies:  # EXPORT_NAME: raw size + flags, nothing else
            assert out.lun is not None
            continue
        for raw in out.replies:
            magic, option, _, length = struct.unpack_from(">QIII", raw)
            assert (magic, option, len(raw)) == (0x3E889045565A9, number, 20 + length)
        assert out.replies or out.close
        if out.close or out.lun is not None:
            return
