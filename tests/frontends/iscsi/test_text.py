"""iSCSI text keys: parsing bounds and the target's answers in operational negotiation."""

from __future__ import annotations

import pytest

from lunseal.frontends.iscsi import text


def test_parse_and_encode_round_trip() -> None:
    pairs = [("HeaderDigest", "CRC32C,None"), ("X-odd", "a=b")]
    data = text.encode(pairs)
    assert data == b"HeaderDigest=CRC32C,None\0X-odd=a=b\0"
    assert text.parse(data + b"\0\0") == pairs  # padding NULs are ignored


@pytest.mark.parametrize(
    "data",
    [b"NoEquals\0", b"=value\0", b"K" * 64 + b"=v\0", b"K=" + b"v" * 8193 + b"\0", b"K=\xff\0"],
)
def test_malformed_text_is_refused(data: bytes) -> None:
    with pytest.raises(text.TextError):
        text.parse(data)


def test_too_many_keys_are_refused() -> None:
    with pytest.raises(text.TextError, match="more than"):
        text.parse(b"".join(b"K%d=1\0" % i for i in range(text.MAX_KEYS + 1)))


def negotiate(**offers: str) -> tuple[dict[str, str], text.Parameters]:
    params = text.Parameters()
    return dict(text.negotiate(list(offers.items()), params)), params


def test_libiscsi_offer() -> None:
    answers, params = negotiate(
        HeaderDigest="None,CRC32C",
        DataDigest="CRC32C,None",
        DefaultTime2Wait="2",
        DefaultTime2Retain="0",
        IFMarker="No",
        OFMarker="No",
        ErrorRecoveryLevel="0",
        InitialR2T="No",
        ImmediateData="Yes",
        MaxBurstLength="262144",
        FirstBurstLength="262144",
        MaxConnections="1",
        DataPDUInOrder="Yes",
        DataSequenceInOrder="Yes",
        MaxOutstandingR2T="1",
        MaxRecvDataSegmentLength="262144",
    )
    assert answers["HeaderDigest"] == "None"  # the initiator's first choice we support
    assert answers["DataDigest"] == "CRC32C"
    assert (params.header_digest, params.data_digest) == (False, True)
    assert answers["InitialR2T"] == "No"
    assert answers["ImmediateData"] == "Yes"
    assert answers["MaxBurstLength"] == "262144"
    assert answers["FirstBurstLength"] == "262144"
    assert answers["ErrorRecoveryLevel"] == "0"
    assert answers["MaxConnections"] == "1"
    assert answers["IFMarker"] == answers["OFMarker"] == "No"
    assert "MaxRecvDataSegmentLength" not in answers  # declarative: no answer
    assert params.initiator_max_recv_data == 262144
    assert not params.initial_r2t
    assert params.first_burst == 262144


def test_lower_of_two_and_our_limits() -> None:
    answers, params = negotiate(
        MaxBurstLength=str(8 << 20),
        FirstBurstLength=str(4 << 20),
        ErrorRecoveryLevel="2",
        MaxConnections="8",
        MaxOutstandingR2T="4",
    )
    assert answers["MaxBurstLength"] == str(text.TARGET_MAX_BURST)
    assert int(answers["FirstBurstLength"]) <= text.TARGET_FIRST_BURST
    assert answers["ErrorRecoveryLevel"] == "0"
    assert answers["MaxConnections"] == "1"
    assert answers["MaxOutstandingR2T"] == "1"
    assert params.max_burst == text.TARGET_MAX_BURST


def test_boolean_rules() -> None:
    answers, params = negotiate(
        ImmediateData="No", InitialR2T="Yes", DataPDUInOrder="No", DataSequenceInOrder="No"
    )
    assert answers["ImmediateData"] == "No"  # AND
    assert answers["InitialR2T"] == "Yes"  # OR
    assert answers["DataPDUInOrder"] == "Yes"  # OR with our Yes
    assert answers["DataSequenceInOrder"] == "Yes"
    assert not params.immediate_data
    assert params.initial_r2t


def test_unknown_bad_and_irrelevant_answers() -> None:
    answers, _ = negotiate(
        **{
            "X-com.example.thing": "1",
            "MaxBurstLength": "ten",
            "HeaderDigest": "MD5",
            "IFMarkInt": "2048~4096",
            "TargetAlias": "mine",
        }
    )
    assert answers["X-com.example.thing"] == text.NOT_UNDERSTOOD
    assert answers["MaxBurstLength"] == text.REJECT
    assert answers["HeaderDigest"] == text.REJECT
    assert answers["IFMarkInt"] == text.IRRELEVANT
    assert answers["TargetAlias"] == text.REJECT


@pytest.mark.parametrize("value", ["511", "16777216", "-1", "0x"])
def test_data_lengths_out_of_range_are_rejected(value: str) -> None:
    answers, params = negotiate(MaxRecvDataSegmentLength=value, FirstBurstLength=value)
    assert answers["MaxRecvDataSegmentLength"] == text.REJECT
    assert answers["FirstBurstLength"] == text.REJECT
    assert params.initiator_max_recv_data == 8192
