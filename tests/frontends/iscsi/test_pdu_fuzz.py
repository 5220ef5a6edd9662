"""Hypothesis against the iSCSI PDU decoder.

Invariant: whatever bytes arrive, in whatever pieces, with or without
digests, the decoder (1) yields PDUs or raises :class:`PduError` and nothing
else, (2) yields the same PDUs and the same error however the bytes are cut,
and (3) never holds more than one maximal PDU plus one receive of bytes.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from lunseal.frontends.iscsi import pdu as p

FUZZ = settings(max_examples=300, deadline=None)
MAX_DATA = 1 << 12  # small so that a fuzzed length cannot make it buffer much
RECEIVE = 16 << 10  # the most one receive_data piece hands over below

Outcome = tuple[list[tuple[bytes, bytes, bytes]], bool]


def run(pieces: list[bytes], header_digest: bool, data_digest: bool) -> Outcome:
    dec = p.PduDecoder(max_data=MAX_DATA)
    dec.header_digest, dec.data_digest = header_digest, data_digest
    got: list[tuple[bytes, bytes, bytes]] = []
    bound = dec.max_pdu_size() + RECEIVE + (64 << 10)
    try:
        for piece in pieces:
            for start in range(0, len(piece), RECEIVE):
                dec.receive_data(piece[start : start + RECEIVE])
                while (pdu := dec.next_pdu()) is not None:
                    got.append((pdu.bhs, pdu.ahs, pdu.data))
                assert dec.capacity <= bound
                assert dec.buffered <= dec.max_pdu_size() + RECEIVE
    except p.PduError:
        return got, True
    return got, False


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


u32 = st.integers(0, 2**32 - 1)


@st.composite
def plausible_pdu(draw: st.DrawFn) -> bytes:
    """A real initiator PDU, sometimes bent: odd opcodes, lengths, AHS, digests."""
    digests = p.Digests(draw(st.booleans()), draw(st.booleans()))
    data = draw(st.binary(max_size=MAX_DATA + 16))
    opcode = draw(
        st.sampled_from([*sorted(p.INITIATOR_OPCODES), 0x20, 0x3F, draw(st.integers(0, 63))])
    )
    ahs = draw(st.sampled_from([b"", bytes(4), bytes(8)]))
    wire = bytearray(
        p.build(
            opcode,
            draw(st.integers(0, 255)),
            itt=draw(u32),
            words=(draw(u32), draw(u32)),
            ahs=ahs,
            data=data,
            digests=digests,
        )
    )
    if draw(st.booleans()) and wire:
        at = draw(st.integers(0, len(wire) - 1))
        wire[at] = draw(st.integers(0, 255))
    return bytes(wire)


streams = st.one_of(
    st.binary(max_size=4096),
    st.lists(plausible_pdu(), max_size=4).map(b"".join),
)


@FUZZ
@given(streams, st.lists(st.integers(0, 20000), max_size=8), st.booleans(), st.booleans())
def test_any_bytes_in_any_pieces(data: bytes, cuts: list[int], hd: bool, dd: bool) -> None:
    whole = run([data], hd, dd)
    assert run(split(data, cuts), hd, dd) == whole
    assert run([bytes([b]) for b in data[:600]] + [data[600:]], hd, dd) == whole


@FUZZ
@given(st.integers(0, 2**24 - 1), st.binary(max_size=64))
def test_a_long_announced_segment_is_refused_before_it_is_buffered(
    length: int, tail: bytes
) -> None:
    header = bytearray(p.nop_out(itt=1, cmdsn=1, exp_statsn=1))
    header[5:8] = length.to_bytes(3, "big")
    got, failed = run([bytes(header) + tail], False, False)
    if length > MAX_DATA:
        assert failed
        assert got == []
    else:
        assert not failed
