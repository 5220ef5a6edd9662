"""Option haggling against a real Array, resolved exactly as the server resolves names."""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.engine.array import Array
from lunseal.engine.lun import Lun
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.negotiation import Negotiator, Outcome
from lunseal.frontends.nbd.server import NbdServer
from tests.support.nbdclient import (
    OptionReply,
    info_request,
    meta_context_request,
    parse_option_reply,
)

MiB = 1 << 20
ACK, SERVER, INFO, META = 1, 2, 3, 4
ERR_UNSUP, ERR_POLICY, ERR_INVALID, ERR_UNKNOWN = (0x80000000 | n for n in (1, 2, 3, 6))
EXPORT_NAME, ABORT, LIST, STARTTLS, OPT_INFO, GO = 1, 2, 3, 5, 6, 7
STRUCTURED, LIST_META, SET_META = 8, 9, 10
HAS_FLAGS, READ_ONLY, SEND_TRIM, SEND_WRITE_ZEROES, SEND_DF = 0x1, 0x2, 0x20, 0x40, 0x80
SEND_FUA, SEND_FAST_ZERO = 0x8, 0x800


@pytest.fixture
def array(tmp_path: Path) -> Iterator[Array]:
    """'second' is LUN 1, 'first' LUN 0 (the default export), 'ro' read-only."""
    arr = Array.open(tmp_path / "home")
    arr.create_lun("second", 2 * MiB, number=1)
    arr.create_lun("first", MiB, number=0)
    arr.create_lun("ro", 3 * MiB, number=2, read_only=True)
    try:
        yield arr
    finally:
        arr.close()


@pytest.fixture
def neg(array: Array) -> Negotiator:
    server = NbdServer(array)
    return Negotiator(resolve=server.resolve, list_exports=array.luns)


def replies(outcome: Outcome) -> list[OptionReply]:
    return [parse_option_reply(raw) for raw in outcome.replies]


def types(outcome: Outcome) -> list[int]:
    return [r.type for r in replies(outcome)]


def infos(outcome: Outcome) -> dict[int, bytes]:
    found = {}
    for r in replies(outcome):
        if r.type == INFO:
            (kind,) = struct.unpack_from(">H", r.data)
            assert kind not in found, "info type sent twice"
            found[kind] = r.data[2:]
    return found


def export_info(outcome: Outcome) -> tuple[int, int]:
    raw = infos(outcome)[0]
    assert len(raw) == 10  # reply length 12 including the type
    size, flags = struct.unpack(">QH", raw)
    return size, flags


def enter_structured(neg: Negotiator) -> None:
    assert types(neg.handle(STRUCTURED, b"")) == [ACK]


# -- LIST -------------------------------------------------------------------------


def test_list_names_every_export_then_acks(neg: Negotiator, array: Array) -> None:
    out = neg.handle(LIST, b"")
    *servers, last = replies(out)
    assert last.type == ACK
    assert all(r.type == SERVER and r.option == LIST for r in servers)
    names = []
    for r in servers:
        (n,) = struct.unpack_from(">I", r.data)
        assert n <= len(r.data) - 4
        names.append(r.data[4 : 4 + n].decode())
    assert names == ["first", "second", "ro"]
    assert not out.close
    assert out.lun is None


def test_list_with_data_is_invalid(neg: Negotiator) -> None:
    assert types(neg.handle(LIST, b"x")) == [ERR_INVALID]


# -- INFO and GO ----------------------------------------------------------------


@pytest.mark.parametrize("option", [OPT_INFO, GO])
def test_unknown_export_is_err_unknown(neg: Negotiator, option: int) -> None:
    out = neg.handle(option, info_request("nope"))
    assert types(out) == [ERR_UNKNOWN]
    assert out.lun is None
    assert not out.close


def test_info_describes_without_entering_transmission(neg: Negotiator) -> None:
    out = neg.handle(OPT_INFO, info_request("second"))
    assert types(out)[-1] == ACK
    assert export_info(out)[0] == 2 * MiB
    assert out.lun is None


def test_go_enters_transmission_on_the_lun(neg: Negotiator, array: Array) -> None:
    out = neg.handle(GO, info_request("second"))
    assert types(out)[-1] == ACK
    assert out.lun is array.lun("second")
    assert export_info(out) == (
        2 * MiB,
        export_info(neg.handle(OPT_INFO, info_request("second")))[1],
    )


def test_empty_name_is_lun_number_zero(neg: Negotiator, array: Array) -> None:
    out = neg.handle(GO, info_request("", (c.INFO_NAME,)))
    assert out.lun is array.lun("first")
    assert export_info(out)[0] == MiB
    assert infos(out)[c.INFO_NAME] == b"first"


def test_empty_name_without_lun_zero_is_unknown(tmp_path: Path) -> None:
    arr = Array.open(tmp_path / "h2")
    try:
        arr.create_lun("only", MiB, number=5)
        neg = Negotiator(resolve=NbdServer(arr).resolve, list_exports=arr.luns)
        assert types(neg.handle(GO, info_request(""))) == [ERR_UNKNOWN]
    finally:
        arr.close()


def test_name_and_description_infos(neg: Negotiator, array: Array) -> None:
    out = neg.handle(OPT_INFO, info_request("second", (c.INFO_NAME, c.INFO_DESCRIPTION)))
    found = infos(out)
    assert found[c.INFO_NAME] == b"second"
    assert array.lun("second").record.uuid in found[c.INFO_DESCRIPTION].decode()


def test_block_size_info_has_valid_constraints(neg: Negotiator) -> None:
    out = neg.handle(OPT_INFO, info_request("second", (c.INFO_BLOCK_SIZE,)))
    raw = infos(out)[c.INFO_BLOCK_SIZE]
    assert len(raw) == 12  # reply length 14 including the type
    minimum, preferred, maximum = struct.unpack(">III", raw)
    assert minimum & (minimum - 1) == 0
    assert minimum <= 64 << 10
    assert preferred & (preferred - 1) == 0
    assert preferred >= max(minimum, 512)
    assert preferred <= 32 * MiB <= maximum


def test_writable_lun_flags(neg: Negotiator) -> None:
    _, flags = export_info(neg.handle(OPT_INFO, info_request("second")))
    assert flags & HAS_FLAGS
    assert not flags & READ_ONLY
    assert flags & SEND_TRIM
    assert flags & SEND_WRITE_ZEROES
    assert flags & SEND_FUA
    assert not flags & SEND_DF  # only with structured replies


def test_read_only_lun_flags(neg: Negotiator) -> None:
    _, flags = export_info(neg.handle(GO, info_request("ro")))
    assert flags & HAS_FLAGS
    assert flags & READ_ONLY
    assert not flags & (SEND_TRIM | SEND_WRITE_ZEROES | SEND_FAST_ZERO)


def test_structured_replies_add_df(neg: Negotiator) -> None:
    enter_structured(neg)
    _, flags = export_info(neg.handle(OPT_INFO, info_request("second")))
    assert flags & SEND_DF


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\x00\x00\x00\x06second", id="count-missing"),
        pytest.param(info_request("second") + b"\x00", id="trailing"),
    ],
)
@pytest.mark.parametrize("option", [OPT_INFO, GO])
def test_malformed_info_request_is_invalid(neg: Negotiator, option: int, data: bytes) -> None:
    out = neg.handle(option, data)
    assert types(out) == [ERR_INVALID]
    assert out.lun is None


# -- STRUCTURED_REPLY and meta contexts ---------------------------------------------


def test_structured_reply(neg: Negotiator) -> None:
    assert not neg.structured
    enter_structured(neg)
    assert neg.structured


def test_structured_reply_with_data_is_invalid(neg: Negotiator) -> None:
    assert types(neg.handle(STRUCTURED, b"\x00")) == [ERR_INVALID]
    assert not neg.structured


def test_set_meta_context_before_structured_is_invalid(neg: Negotiator) -> None:
    out = neg.handle(SET_META, meta_context_request("second", ("base:allocation",)))
    assert types(out) == [ERR_INVALID]
    assert not neg.base_allocation


def test_list_meta_context_before_structured_lists(neg: Negotiator) -> None:
    """As nbdkit and qemu-nbd do: listing selects nothing, so it needs no structured replies."""
    out = neg.handle(LIST_META, meta_context_request("second", ("base:allocation",)))
    assert contexts(out) == ["base:allocation"]
    assert not neg.base_allocation


@pytest.mark.parametrize("option", [6, 7, LIST_META, SET_META, 0xBEEF])
def test_oversize_option_is_too_big_and_negotiation_goes_on(neg: Negotiator, option: int) -> None:
    out = neg.handle(option, b"", oversize=True)
    assert types(out) == [0x80000009]  # NBD_REP_ERR_TOO_BIG
    assert not out.close
    assert out.lun is None


def test_oversize_export_name_hangs_up(neg: Negotiator) -> None:
    out = neg.handle(1, b"", oversize=True)
    assert (out.replies, out.close) == ([], True)


def contexts(out: Outcome) -> list[str]:
    found = [r for r in replies(out) if r.type == META]
    assert types(out) == [META] * len(found) + [ACK]
    return [r.data[4:].decode() for r in found]


@pytest.mark.parametrize(
    ("queries", "expected"),
    [
        pytest.param((), ["base:allocation"], id="no-query-lists-all"),
        pytest.param(("base:",), ["base:allocation"], id="namespace-wildcard"),
        pytest.param(("base:allocation",), ["base:allocation"], id="exact"),
        pytest.param(("qemu:dirty-bitmap:x",), [], id="unknown-namespace-ignored"),
        pytest.param(("base:nope",), [], id="unknown-leaf"),
    ],
)
def test_list_meta_context(neg: Negotiator, queries: tuple[str, ...], expected: list[str]) -> None:
    enter_structured(neg)
    assert contexts(neg.handle(LIST_META, meta_context_request("second", queries))) == expected
    assert not neg.base_allocation  # listing selects nothing


def test_set_meta_context_selects_base_allocation(neg: Negotiator) -> None:
    enter_structured(neg)
    out = neg.handle(SET_META, meta_context_request("second", ("x-foo:bar", "base:allocation")))
    assert contexts(out) == ["base:allocation"]
    assert neg.base_allocation
    assert neg.handle(GO, info_request("second")).lun is not None
    assert neg.base_allocation


def test_contexts_do_not_carry_over_to_another_export(neg: Negotiator) -> None:
    enter_structured(neg)
    neg.handle(SET_META, meta_context_request("second", ("base:allocation",)))
    assert neg.handle(GO, info_request("first")).lun is not None
    assert not neg.base_allocation


def test_set_meta_context_without_queries_selects_nothing(neg: Negotiator) -> None:
    enter_structured(neg)
    neg.handle(SET_META, meta_context_request("second", ("base:allocation",)))
    assert contexts(neg.handle(SET_META, meta_context_request("second", ()))) == []
    assert not neg.base_allocation


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(meta_context_request("nope", ("base:allocation",)), id="unknown-export"),
        pytest.param(b"\x00\x00\x00\x06second", id="malformed"),
    ],
)
def test_failed_set_meta_context_still_replaces_the_selection(neg: Negotiator, data: bytes) -> None:
    """proto.md: SET replaces all previous contexts, including when it fails."""
    enter_structured(neg)
    neg.handle(SET_META, meta_context_request("second", ("base:allocation",)))
    out = neg.handle(SET_META, data)
    assert replies(out)[-1].is_error
    neg.handle(GO, info_request("second"))
    assert not neg.base_allocation


@pytest.mark.parametrize("option", [LIST_META, SET_META])
def test_meta_context_for_unknown_export(neg: Negotiator, option: int) -> None:
    enter_structured(neg)
    out = neg.handle(option, meta_context_request("nope", ("base:allocation",)))
    assert types(out) == [ERR_UNKNOWN]


def test_list_meta_context_ids_are_zero(neg: Negotiator) -> None:
    """proto.md: the context id in LIST_META_CONTEXT replies is reserved, SHOULD be 0."""
    enter_structured(neg)
    out = neg.handle(LIST_META, meta_context_request("second", ()))
    assert [r.data[:4] for r in replies(out) if r.type == META] == [bytes(4)]


def test_set_meta_context_id_is_nonzero(neg: Negotiator) -> None:
    enter_structured(neg)
    out = neg.handle(SET_META, meta_context_request("second", ("base:allocation",)))
    ids = [struct.unpack_from(">I", r.data)[0] for r in replies(out) if r.type == META]
    assert len(ids) == 1
    assert ids[0] != 0


# -- everything else -----------------------------------------------------------------


@pytest.mark.parametrize("option", [0, 4, 11, 12, 0xBEEF, 0xFFFFFFFF])
def test_unknown_option_is_unsupported(neg: Negotiator, option: int) -> None:
    out = neg.handle(option, b"whatever")
    assert replies(out) == [OptionReply(option, ERR_UNSUP, replies(out)[0].data)]
    assert not out.close


def test_starttls_without_tls_is_refused_but_not_tls_reqd(neg: Negotiator) -> None:
    assert types(neg.handle(STARTTLS, b"")) in ([ERR_UNSUP], [ERR_POLICY])


@pytest.mark.parametrize("data", [b"", b"ignored"])
def test_abort_acks_and_closes(neg: Negotiator, data: bytes) -> None:
    out = neg.handle(ABORT, data)
    assert types(out) == [ACK]
    assert out.close
    assert out.lun is None


def test_export_name_unknown_closes_without_reply(neg: Negotiator) -> None:
    out = neg.handle(EXPORT_NAME, b"nope")
    assert out.replies == []
    assert out.close


@pytest.mark.parametrize("data", [b"sec\x00ond", b"\xff\xfe", b"a" * 4097])
def test_export_name_malformed_closes_without_reply(neg: Negotiator, data: bytes) -> None:
    """EXPORT_NAME has no error reply: an option reply here would desync the client."""
    out = neg.handle(EXPORT_NAME, data)
    assert out.replies == []
    assert out.close


@pytest.mark.parametrize(("no_zeroes", "length"), [(True, 10), (False, 134)])
def test_export_name_reply_and_no_zeroes(
    neg: Negotiator, array: Array, no_zeroes: bool, length: int
) -> None:
    neg.no_zeroes = no_zeroes
    out = neg.handle(EXPORT_NAME, b"ro")
    [raw] = out.replies
    assert len(raw) == length
    size, flags = struct.unpack_from(">QH", raw)
    assert (size, flags & READ_ONLY) == (3 * MiB, READ_ONLY)
    assert raw[10:] == bytes(length - 10)
    assert out.lun is array.lun("ro")


def test_export_name_default_export(neg: Negotiator, array: Array) -> None:
    out = neg.handle(EXPORT_NAME, b"")
    lun: Lun | None = out.lun
    assert lun is array.lun("first")


def test_go_reply_never_has_zero_padding(neg: Negotiator) -> None:
    neg.no_zeroes = False
    out = neg.handle(GO, info_request("second"))
    assert all(r.data == b"" for r in replies(out) if r.type == ACK)
    assert sum(len(raw) for raw in out.replies) == sum(20 + len(r.data) for r in replies(out))


# -- unavailable LUNs ---------------------------------------------------------------


@pytest.fixture
def unavailable(tmp_path: Path) -> Iterator[Array]:
    """'gone' lost its backing file while the array was down; 'here' is fine."""
    disk = tmp_path / "gone.img"
    disk.write_bytes(bytes(MiB))
    arr = Array.open(tmp_path / "home")
    arr.create_lun("gone", None, number=0, path=disk)
    arr.create_lun("here", MiB, number=1)
    arr.close()
    disk.unlink()
    arr = Array.open(tmp_path / "home")
    try:
        yield arr
    finally:
        arr.close()


@pytest.mark.parametrize("option", [OPT_INFO, GO])
@pytest.mark.parametrize("name", ["gone", ""])
def test_an_unavailable_export_is_refused_with_the_reason(
    unavailable: Array, option: int, name: str
) -> None:
    neg = Negotiator(resolve=NbdServer(unavailable).resolve, list_exports=unavailable.luns)
    outcome = neg.handle(option, info_request(name))
    [reply] = replies(outcome)
    assert reply.type == ERR_UNKNOWN
    assert "export 'gone' is unavailable: backing file" in reply.text
    assert outcome.lun is None
    assert neg.handle(GO, info_request("here")).lun is unavailable.lun("here")


def test_an_unavailable_export_is_neither_listed_nor_opened(unavailable: Array) -> None:
    neg = Negotiator(resolve=NbdServer(unavailable).resolve, list_exports=unavailable.luns)
    listed = [r for r in replies(neg.handle(LIST, b"")) if r.type == SERVER]
    assert len(listed) == 1
    assert b"here" in listed[0].data
    assert neg.handle(EXPORT_NAME, b"gone") == Outcome([], close=True)
    enter_structured(neg)
    for option in (LIST_META, SET_META):
        outcome = neg.handle(option, meta_context_request("gone", ("base:allocation",)))
        assert types(outcome) == [ERR_UNKNOWN]
