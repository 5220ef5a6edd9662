"""STATE IN / STATE OUT (C1h / C0h) on a real array: byte layouts, sense, and the
same tracker calls as the API (a token read in-band is the API's token)."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.engine.state.tracker import TrackingMode
from lunseal.errors import InvalidArgument
from lunseal.frontends.api.state_routes import state_info
from lunseal.frontends.scsi import state_commands as sc
from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD, Nexus, ScsiCommand, ScsiResult
from lunseal.frontends.scsi.target import ScsiTarget
from tests.support.arrays import Arrays

NEXUS = Nexus("iqn.2026-12.test:host", "iqn.2026-12.test:host,i,0x1", "tgt,t,0x1")
OTHER = Nexus("iqn.2026-12.test:other", "iqn.2026-12.test:other,i,0x2", "tgt,t,0x1")


@pytest.fixture
def array(tmp_path: Path) -> Iterator[Array]:
    arrays = Arrays(tmp_path / "data")
    arr = arrays.open()
    arr.create_lun("a", 1 << 20)
    try:
        yield arr
    finally:
        arrays.close()


@pytest.fixture
def lun(array: Array) -> Lun:
    return array.lun("a")


def run(lun: Lun, cdb: bytes, data: bytes = b"", nexus: Nexus = NEXUS) -> ScsiResult:
    """On the LUN's worker, as the transport calls it."""
    cmd = ScsiCommand(lun=lun.record.number, cdb=cdb, nexus=nexus, data_out=data)
    return lun.run(lambda: sc.execute(lun, cmd))


def out(lun: Lun, action: sc.OutAction, params: bytes, list_id: int = 0) -> ScsiResult:
    return run(lun, sc.state_out_cdb(action, len(params), list_id), params)


def acquire(lun: Lun, name: str = "default", **kw: object) -> ScsiResult:
    return out(lun, sc.OutAction.ACQUIRE_HOLD, sc.acquire_parameters(sc.HoldRequest(name, **kw)))  # type: ignore[arg-type]


def read_token(lun: Lun, allocation: int = 4096) -> sc.TokenReport:
    result = run(lun, sc.state_in_cdb(sc.InAction.READ_TOKEN, allocation))
    assert result.status == GOOD, result.sense.hex()
    return sc.decode_token_report(bytes(result.data))  # type: ignore[arg-type]


def check(lun: Lun, token: str, list_id: int = 0, nexus: Nexus = NEXUS) -> sc.CheckReport:
    params = sc.string_parameters(token)
    result = run(
        lun, sc.state_out_cdb(sc.OutAction.CHECK_TOKEN, len(params), list_id), params, nexus
    )
    assert result.status == GOOD, result.sense.hex()
    return report(lun, list_id, nexus)


def report(lun: Lun, list_id: int = 0, nexus: Nexus = NEXUS) -> sc.CheckReport:
    result = run(lun, sc.state_in_cdb(sc.InAction.REPORT_CHECK_RESULT, 4096, list_id), nexus=nexus)
    assert result.status == GOOD, result.sense.hex()
    return sc.decode_check_report(bytes(result.data))  # type: ignore[arg-type]


def sense_of(result: ScsiResult) -> tuple[int, int, int]:
    assert result.status == CHECK_CONDITION
    s = result.sense
    assert s[0] == 0x70
    assert len(s) == 8 + s[7]
    return s[2] & 0x0F, s[12], s[13]


def field_pointer(result: ScsiResult) -> tuple[bool, int, int]:
    """(in CDB, byte, bit) of the sense-key-specific field pointer."""
    s = result.sense
    assert s[15] & 0x80, "SKSV"
    return bool(s[15] & 0x40), struct.unpack_from(">H", s, 16)[0], s[15] & 0x07


def message(result: ScsiResult) -> str:
    return result.sense[18:].decode()


# -- byte layouts ---------------------------------------------------------------------


def test_cdb_layouts_byte_by_byte() -> None:
    assert sc.state_out_cdb(sc.OutAction.CHECK_TOKEN, 0x0102, list_id=7) == bytes(
        [0xC0, 0x02, 0x07, 0, 0, 0, 0x00, 0x00, 0x01, 0x02, 0, 0]
    )
    assert sc.state_in_cdb(sc.InAction.READ_TOKEN, 0x01020304) == bytes(
        [0xC1, 0x00, 0, 0, 0, 0, 0x01, 0x02, 0x03, 0x04, 0, 0]
    )


def test_acquire_parameters_byte_by_byte() -> None:
    params = sc.acquire_parameters(sc.HoldRequest("bk", TrackingMode.FLAG, 1 << 16))
    assert params == bytes([3, 1, 16, 0, 0, 2, 0, 0]) + b"bk"
    assert sc.string_parameters("x") == bytes([0, 0, 0, 0, 0, 1, 0, 0]) + b"x"


def test_token_report_byte_by_byte() -> None:
    data = sc.encode_token_report(
        sc.TokenReport(True, False, TrackingMode.COUNTER, "T", [sc.HoldToken("h", "U", 4096)])
    )
    body = bytes([0b01, 1, 0, 1]) + b"T" + bytes([0, 1, 0, 1, 12, 0, 0, 0]) + b"hU"
    assert data == struct.pack(">I", len(body)) + body
    assert sc.decode_token_report(data).holds == [sc.HoldToken("h", "U", 4096)]


def test_check_report_byte_by_byte() -> None:
    data = sc.encode_check_report(sc.CheckReport(False, "why", "C"))
    body = bytes([1, 0, 0, 3, 0, 1, 0, 0]) + b"whyC"
    assert data == struct.pack(">I", len(body)) + body
    assert sc.decode_check_report(data) == sc.CheckReport(False, "why", "C")


def test_data_out_length_is_the_parameter_list_length_bounded() -> None:
    assert sc.data_out_length(sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, 20)) == 20
    assert sc.data_out_length(sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, 1 << 31)) == 0
    assert sc.data_out_length(sc.state_in_cdb(sc.InAction.READ_TOKEN, 20)) == 0
    assert sc.data_out_length(b"\xc0\x1f" + bytes(10)) == 0


# -- behaviour: the API's calls, in-band -------------------------------------------------------


def test_token_read_in_band_equals_the_apis(lun: Lun, array: Array) -> None:
    assert read_token(lun) == sc.TokenReport(False, True, TrackingMode.COUNTER, None, [])
    assert acquire(lun, "backup", mode=TrackingMode.TIMESTAMP, granularity=1 << 16).status == GOOD
    report_ = read_token(lun)
    api = lun.run(lambda: state_info(array.tracker("a")))
    assert report_.tracking
    assert api.token
    assert report_.token == api.token
    assert report_.mode == TrackingMode.TIMESTAMP
    hold = array.tracker("a").hold("backup")  # visible the way an API hold is
    assert report_.holds == [sc.HoldToken("backup", hold.token, 1 << 16)]


def test_write_then_check_says_changed_with_the_reason(lun: Lun) -> None:
    acquire(lun)
    token = read_token(lun).token
    assert token is not None
    intact = check(lun, token)
    assert intact == sc.CheckReport(
        True, "no data-changing operation since the token was issued", token
    )
    lun.run(lambda: lun.write(0, b"x" * 512))
    answer = check(lun, token, list_id=3)
    assert not answer.intact
    assert "written" in answer.reason
    assert answer.current == read_token(lun).token != token
    assert report(lun, 0).intact  # list 0 still holds the earlier answer


def test_release_turns_tracking_off_and_changes_the_state(lun: Lun) -> None:
    acquire(lun)
    token = read_token(lun).token
    assert out(lun, sc.OutAction.RELEASE_HOLD, sc.string_parameters("")).status == GOOD
    assert read_token(lun).tracking is False
    acquire(lun)
    assert read_token(lun).token != token


def test_flag_mode_token_equals_the_apis_after_a_write(lun: Lun, array: Array) -> None:
    acquire(lun, mode=TrackingMode.FLAG)
    lun.run(lambda: lun.write(0, b"y" * 512))
    in_band = read_token(lun).token  # re-arms the flag, as the API's read does
    assert in_band == lun.run(lambda: state_info(array.tracker("a"))).token


def test_results_are_per_nexus(lun: Lun) -> None:
    acquire(lun)
    token = read_token(lun).token
    assert token is not None
    check(lun, token, nexus=NEXUS)
    result = run(lun, sc.state_in_cdb(sc.InAction.REPORT_CHECK_RESULT, 4096), nexus=OTHER)
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x24, 0)
    assert field_pointer(result) == (True, 2, 7)
    sc.nexus_gone(NEXUS.initiator_port, NEXUS.target_port)
    assert (
        run(lun, sc.state_in_cdb(sc.InAction.REPORT_CHECK_RESULT, 4096)).status == CHECK_CONDITION
    )


def test_allocation_length_truncates_but_keeps_the_full_data_length(lun: Lun) -> None:
    acquire(lun)
    result = run(lun, sc.state_in_cdb(sc.InAction.READ_TOKEN, 6))
    assert result.status == GOOD
    data = bytes(result.data)  # type: ignore[arg-type]
    assert len(data) == 6
    (n,) = struct.unpack_from(">I", data)
    assert n > 2
    with pytest.raises(InvalidArgument, match="truncated"):
        sc.decode_token_report(data)


# -- errors: exact sense ------------------------------------------------------------------------


def test_unknown_service_action(lun: Lun) -> None:
    result = run(lun, bytes([0xC1, 0x05]) + bytes(10))
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x24, 0)
    assert field_pointer(result) == (True, 1, 4)


def test_other_vendor_opcodes_are_unknown(lun: Lun) -> None:
    result = run(lun, bytes([0xC5, 0x05]) + bytes(14))  # no such action of C1h either
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x20, 0)
    assert field_pointer(result) == (True, 0, 7)


def test_reserved_cdb_byte_and_short_cdb(lun: Lun) -> None:
    cdb = bytearray(sc.state_in_cdb(sc.InAction.READ_TOKEN, 64))
    cdb[4] = 1
    assert field_pointer(run(lun, bytes(cdb))) == (True, 4, 7)
    assert sense_of(run(lun, bytes(cdb[:10])))[1] == 0x24


def test_list_identifier_only_for_checks(lun: Lun) -> None:
    result = run(lun, sc.state_in_cdb(sc.InAction.READ_TOKEN, 64, list_id=1))
    assert field_pointer(result) == (True, 2, 7)


def test_parameter_list_too_long_or_short(lun: Lun) -> None:
    result = run(lun, sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, 1 << 20))
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x24, 0)
    assert field_pointer(result) == (True, 6, 7)
    result = run(lun, sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, 4), b"\0" * 4)
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x1A, 0)
    result = run(lun, sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, 20), sc.string_parameters("ab"))
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x0E, 0x03)  # less data than announced
    params = bytes([0, 0, 0, 0, 0, 9, 0, 0]) + b"ab"  # claims 9 bytes of name
    assert sense_of(out(lun, sc.OutAction.ACQUIRE_HOLD, params))[1] == 0x1A


def test_bad_parameter_fields(lun: Lun) -> None:
    bad_mode = bytes([9, 0, 0, 0, 0, 0, 0, 0])
    result = out(lun, sc.OutAction.ACQUIRE_HOLD, bad_mode)
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x26, 0)
    assert field_pointer(result) == (False, 0, 7)
    bad_exponent = bytes([0, 1, 31, 0, 0, 0, 0, 0])
    assert field_pointer(out(lun, sc.OutAction.ACQUIRE_HOLD, bad_exponent)) == (False, 2, 7)
    exponent_without_map = bytes([0, 0, 16, 0, 0, 0, 0, 0])
    assert field_pointer(out(lun, sc.OutAction.ACQUIRE_HOLD, exponent_without_map)) == (False, 2, 7)
    not_utf8 = bytes([0, 0, 0, 0, 0, 1, 0, 0, 0xFF])
    assert field_pointer(out(lun, sc.OutAction.ACQUIRE_HOLD, not_utf8)) == (False, 8, 7)
    mode_on_release = bytes([1]) + sc.string_parameters("h")[1:]
    assert field_pointer(out(lun, sc.OutAction.RELEASE_HOLD, mode_on_release)) == (False, 0, 7)
    flag_on_check = bytes([0, 1]) + sc.string_parameters("t")[2:]
    assert field_pointer(out(lun, sc.OutAction.CHECK_TOKEN, flag_on_check)) == (False, 1, 7)
    trailing = sc.string_parameters("h") + b"\x01"
    assert field_pointer(out(lun, sc.OutAction.RELEASE_HOLD, trailing)) == (False, 9, 7)
    assert read_token(lun).tracking is False  # nothing was acquired


def test_invalid_hold_name_is_an_invalid_parameter_with_the_message(lun: Lun) -> None:
    result = acquire(lun, "a/b")
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x26, 0)
    assert field_pointer(result) == (False, 8, 7)
    assert "invalid hold name" in message(result)


def test_conflicts_and_missing_holds_have_vendor_codes(lun: Lun) -> None:
    acquire(lun, "h", mode=TrackingMode.COUNTER)
    result = acquire(lun, "h")
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, sc.ASC_STATE, sc.ASCQ_CONFLICT)
    assert "already has a hold named 'h'" in message(result)
    result = acquire(lun, "other", mode=TrackingMode.FLAG)
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, sc.ASC_STATE, sc.ASCQ_CONFLICT)
    result = out(lun, sc.OutAction.RELEASE_HOLD, sc.string_parameters("nope"))
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, sc.ASC_STATE, sc.ASCQ_NOT_FOUND)


def test_check_of_something_not_a_token(lun: Lun) -> None:
    acquire(lun)
    params = sc.string_parameters("garbage")
    result = out(lun, sc.OutAction.CHECK_TOKEN, params)
    assert sense_of(result) == (sc.ILLEGAL_REQUEST, 0x26, 0)
    assert "not a lunseal state token" in message(result)


def test_check_results_are_bounded() -> None:
    results = sc.CheckResults(limit=8, per_nexus=3)
    answer = sc.CheckReport(True, "r", None)
    for i in range(10):
        results.put(("a", "t", "lun", i), answer)
    assert len(results) == 3  # one nexus keeps its newest three
    for i in range(10):
        results.put((f"i{i}", "t", "lun", 0), answer)
    assert len(results) == 8
    assert results.get(("i9", "t", "lun", 0)) == answer


def test_through_the_scsi_target_dispatch(array: Array, lun: Lun) -> None:
    """The vendor hook of ScsiTarget reaches this module, data-out length included."""
    target = ScsiTarget(array)
    params = sc.acquire_parameters(sc.HoldRequest("via-target"))
    cdb = sc.state_out_cdb(sc.OutAction.ACQUIRE_HOLD, len(params))
    assert target.data_out_length(NEXUS, lun.record.number, cdb) == len(params)

    def execute(cdb: bytes, data: bytes = b"", expected: int = 0) -> ScsiResult:
        cmd = ScsiCommand(lun.record.number, cdb, NEXUS, data, expected)
        for _ in range(4):  # a new nexus first hears a unit attention
            result = lun.run(lambda: target.execute(cmd))
            if result.status != CHECK_CONDITION or result.sense[2] & 0x0F != 0x06:
                return result
        raise AssertionError("unit attentions never end")

    assert execute(cdb, params).status == GOOD
    result = execute(sc.state_in_cdb(sc.InAction.READ_TOKEN, 4096), expected=4096)
    report_ = sc.decode_token_report(bytes(result.data))  # type: ignore[arg-type]
    assert [h.name for h in report_.holds] == ["via-target"]
    assert report_.token == lun.run(lambda: state_info(array.tracker("a"))).token
