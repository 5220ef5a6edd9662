"""Hypothesis, for the state commands' parsers on both sides.

Invariants: whatever CDB and parameter data an initiator sends, ``execute``
returns GOOD or CHECK CONDITION with well-formed fixed sense and never raises;
the data-out it asks for is at most 1024 bytes.  Whatever bytes a target
answers with, the host's decoders return a report or raise InvalidArgument.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lunseal.engine.array import Array
from lunseal.errors import InvalidArgument
from lunseal.frontends.scsi import state_commands as sc
from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD, Nexus, ScsiCommand
from tests.support.arrays import Arrays

FUZZ = settings(
    max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
NEXUS = Nexus("iqn.2026-12.test:fuzz", "iqn.2026-12.test:fuzz,i,0x1", "tgt,t,0x1")


@pytest.fixture(scope="module")
def array(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Array]:
    arrays = Arrays(tmp_path_factory.mktemp("fuzz") / "data")
    arr = arrays.open()
    arr.create_lun("a", 1 << 20)
    try:
        yield arr
    finally:
        arrays.close()


def cdbs() -> st.SearchStrategy[bytes]:
    """Mostly near-valid CDBs: a state opcode, a small action, a small length."""
    head = st.tuples(
        st.sampled_from([0xC0, 0xC1, 0xC2, 0xFF]),
        st.integers(0, 0xFF) | st.integers(0, 3),
        st.integers(0, 0xFF) | st.just(0),
    )
    length = st.integers(0, 2000) | st.integers(0, (1 << 32) - 1)
    tail = st.binary(min_size=0, max_size=6)
    return st.builds(
        lambda h, n, t: bytes(h) + bytes(3) + n.to_bytes(4, "big") + t, head, length, tail
    ) | st.binary(max_size=16)


def params() -> st.SearchStrategy[bytes]:
    near = st.builds(
        lambda head, n, s: bytes(head) + n.to_bytes(2, "big") + bytes(2) + s,
        st.lists(st.integers(0, 3) | st.integers(0, 255), min_size=4, max_size=4),
        st.integers(0, 40),
        st.binary(max_size=40) | st.text(max_size=20).map(str.encode),
    )
    return near | st.binary(max_size=64)


@FUZZ
@given(cdb=cdbs(), data=params())
def test_execute_never_raises(array: Array, cdb: bytes, data: bytes) -> None:
    lun = array.lun("a")
    asked = sc.data_out_length(cdb)
    assert 0 <= asked <= sc.MAX_PARAMETER_LENGTH
    cmd = ScsiCommand(lun.record.number, cdb, NEXUS, data[:asked] if asked else data, 4096)
    result = lun.run(lambda: sc.execute(lun, cmd))
    assert result.status in (GOOD, CHECK_CONDITION)
    if result.status == CHECK_CONDITION:
        sense = result.sense
        assert sense[0] == 0x70
        assert len(sense) == 8 + sense[7] <= sc.SENSE_MAX
    # Whatever holds a run acquired, the next runs start from none.
    tracker = sc.tracker_of(lun)
    for name in list(tracker.holds):
        lun.run(functools.partial(tracker.release, name))


@FUZZ
@given(data=st.binary(max_size=200))
def test_decoders_raise_only_invalid_argument(data: bytes) -> None:
    for decode in (sc.decode_token_report, sc.decode_check_report):
        with contextlib.suppress(InvalidArgument):
            decode(data)


@FUZZ
@given(data=st.binary(max_size=120), length=st.integers(0, 200))
@example(data=bytes([0, 0, 0, 1, 0, 0, 0, 0, 0xFF]), length=9)  # a reason that is not UTF-8
@example(data=bytes([1, 1, 0, 1, 0xFF]), length=5)  # a token that is not UTF-8
def test_decoders_on_framed_garbage(data: bytes, length: int) -> None:
    framed = length.to_bytes(4, "big") + data
    for decode in (sc.decode_token_report, sc.decode_check_report):
        with contextlib.suppress(InvalidArgument):
            decode(framed)
