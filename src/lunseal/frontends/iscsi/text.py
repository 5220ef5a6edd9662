"""iSCSI text keys (RFC 7143 section 6 and 13): ``key=value`` pairs, each
ended by a NUL byte, and the target's side of operational negotiation.

:class:`Parameters` holds what a connection and its session run with; it
starts at the RFC defaults and :func:`negotiate` answers the keys an
initiator offers, updating it.  Every offered key is answered, with
``NotUnderstood`` for unknown keys, ``Irrelevant`` for keys made moot by
another answer and ``Reject`` for values outside the key's domain.
"""

from __future__ import annotations

from dataclasses import dataclass

from lunseal.errors import ProtocolError

#: Bytes a key's name may have; a value at most this (RFC 7143 6.1: 255 / 8192).
MAX_KEY = 63
MAX_VALUE = 8192
#: Keys one text or login exchange may carry (bounds the parsed dictionary).
MAX_KEYS = 128

NOT_UNDERSTOOD = "NotUnderstood"
IRRELEVANT = "Irrelevant"
REJECT = "Reject"

# What this target offers and wants (its own limits).
TARGET_MAX_RECV_DATA = 256 << 10
TARGET_MAX_BURST = 1 << 20
TARGET_FIRST_BURST = 256 << 10
MIN_DATA_LENGTH = 512
MAX_DATA_LENGTH = (1 << 24) - 1


class TextError(ProtocolError):
    """Text data that is not a sequence of NUL-terminated ``key=value`` pairs."""


def parse(data: bytes) -> list[tuple[str, str]]:
    """Pairs in order.  Trailing padding NULs are ignored; a pair without '=',
    an over-long key or value, non-UTF-8 or too many keys is a :class:`TextError`."""
    pairs: list[tuple[str, str]] = []
    for raw in data.split(b"\0"):
        if not raw:
            continue
        key, sep, value = raw.partition(b"=")
        if not sep or not key:
            raise TextError(f"malformed text key {raw[:40]!r}")
        if len(key) > MAX_KEY or len(value) > MAX_VALUE:
            raise TextError("text key or value too long")
        try:
            pairs.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise TextError("text key is not UTF-8") from None
        if len(pairs) > MAX_KEYS:
            raise TextError(f"more than {MAX_KEYS} text keys")
    return pairs


def encode(pairs: list[tuple[str, str]] | dict[str, str]) -> bytes:
    items = pairs.items() if isinstance(pairs, dict) else pairs
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in items)


@dataclass
class Parameters:
    """Negotiated connection and session parameters (RFC 7143 defaults)."""

    header_digest: bool = False
    data_digest: bool = False
    #: What the initiator receives per PDU (bounds our Data-In, Text, NOP-In).
    initiator_max_recv_data: int = 8192
    #: What we receive per PDU (we declare it).
    target_max_recv_data: int = TARGET_MAX_RECV_DATA
    max_burst: int = 262144
    first_burst: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    data_pdu_in_order: bool = True
    data_sequence_in_order: bool = True
    max_outstanding_r2t: int = 1
    default_time2wait: int = 2
    default_time2retain: int = 20
    error_recovery_level: int = 0
    max_connections: int = 1


def parse_number(value: str, low: int, high: int) -> int | None:
    try:
        n = int(value, 0)
    except ValueError:
        return None
    return n if low <= n <= high else None


def _boolean(value: str) -> bool | None:
    return {"Yes": True, "No": False}.get(value)


def _digest(value: str) -> tuple[str, bool] | None:
    """The first of the offered digests we support (the initiator's order)."""
    for choice in value.split(","):
        if choice == "CRC32C":
            return "CRC32C", True
        if choice == "None":
            return "None", False
    return None


# Keys that mean something only during login; a Text request offering them
# after login gets Reject ("irrelevant in full feature phase").
LOGIN_ONLY = frozenset(
    {
        "HeaderDigest",
        "DataDigest",
        "MaxConnections",
        "InitialR2T",
        "ImmediateData",
        "MaxBurstLength",
        "FirstBurstLength",
        "DefaultTime2Wait",
        "DefaultTime2Retain",
        "MaxOutstandingR2T",
        "DataPDUInOrder",
        "DataSequenceInOrder",
        "ErrorRecoveryLevel",
        "SessionType",
        "InitiatorName",
        "TargetName",
        "OFMarker",
        "IFMarker",
        "OFMarkInt",
        "IFMarkInt",
    }
)
#: Keys declared by the initiator that need no answer.
DECLARATIVE = frozenset({"InitiatorName", "InitiatorAlias", "TargetName", "SessionType"})


def negotiate(offers: list[tuple[str, str]], params: Parameters) -> list[tuple[str, str]]:
    """Answer the operational keys of a login request, updating ``params``.

    Security and declarative keys (AuthMethod, CHAP_*, InitiatorName, ...) are
    the caller's; they are skipped here.
    """
    answers: list[tuple[str, str]] = []
    for key, value in offers:
        if key in DECLARATIVE or key == "AuthMethod" or key.startswith("CHAP_"):
            continue
        answer = _answer(key, value, params)
        if answer is not None:
            answers.append((key, answer))
    return answers


#: Keys answered with the lower of the two values: (lowest legal value, ours).
_MINIMUM = {"ErrorRecoveryLevel": (0, 0), "MaxConnections": (1, 1), "MaxOutstandingR2T": (1, 1)}


def _answer(key: str, value: str, p: Parameters) -> str | None:
    if key in ("HeaderDigest", "DataDigest"):
        chosen = _digest(value)
        if chosen is None:
            return REJECT
        if key == "HeaderDigest":
            p.header_digest = chosen[1]
        else:
            p.data_digest = chosen[1]
        return chosen[0]
    if key == "MaxRecvDataSegmentLength":
        n = parse_number(value, MIN_DATA_LENGTH, MAX_DATA_LENGTH)
        if n is None:
            return REJECT
        p.initiator_max_recv_data = n
        return None  # declarative: ours is declared once per login by the caller
    if key in ("MaxBurstLength", "FirstBurstLength"):
        n = parse_number(value, MIN_DATA_LENGTH, MAX_DATA_LENGTH)
        if n is None:
            return REJECT
        if key == "MaxBurstLength":
            p.max_burst = min(n, TARGET_MAX_BURST)
            p.first_burst = min(p.first_burst, p.max_burst)
            return str(p.max_burst)
        p.first_burst = min(n, TARGET_FIRST_BURST, p.max_burst)
        return str(p.first_burst)
    if key in ("ImmediateData", "InitialR2T", "DataPDUInOrder", "DataSequenceInOrder"):
        b = _boolean(value)
        if b is None:
            return REJECT
        if key == "ImmediateData":  # AND with our Yes
            p.immediate_data = b
            return _yes_no(b)
        if key == "InitialR2T":  # OR with our No: unsolicited data is welcome
            p.initial_r2t = b
            return _yes_no(b)
        return "Yes"  # OR with our Yes: data always arrives in order
    if key in ("IFMarker", "OFMarker"):
        return "No" if _boolean(value) is not None else REJECT
    if key in ("IFMarkInt", "OFMarkInt"):
        return IRRELEVANT
    if key in ("ErrorRecoveryLevel", "MaxConnections", "MaxOutstandingR2T"):
        low, ours = _MINIMUM[key]
        n = parse_number(value, low, 65535)
        if n is None:
            return REJECT
        least = min(n, ours)
        if key == "MaxOutstandingR2T":
            p.max_outstanding_r2t = least
        elif key == "MaxConnections":
            p.max_connections = least
        else:
            p.error_recovery_level = least
        return str(least)
    if key == "DefaultTime2Wait":
        n = parse_number(value, 0, 3600)
        if n is None:
            return REJECT
        p.default_time2wait = max(n, 0)
        return str(p.default_time2wait)
    if key == "DefaultTime2Retain":
        # ERL 0 keeps nothing for reinstatement: 0 whatever is offered.
        if parse_number(value, 0, 3600) is None:
            return REJECT
        p.default_time2retain = 0
        return "0"
    if key in ("TargetAlias", "TargetAddress", "TargetPortalGroupTag"):
        return REJECT  # the target declares these; an initiator may not
    return NOT_UNDERSTOOD


def _yes_no(b: bool) -> str:
    return "Yes" if b else "No"
