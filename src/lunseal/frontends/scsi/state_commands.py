"""The seed's state commands in-band: two vendor-specific SCSI commands.

``STATE OUT`` (C0h) acquires or releases a hold, or submits a token to check;
``STATE IN`` (C1h) reads the LUN's token and holds, or the result of a check.
Both are 12-byte CDBs shaped like SPC's MAINTENANCE IN/OUT: service action in
byte 1 bits 4-0, a length in bytes 6-9.  Byte-by-byte layouts are in
``docs/iscsi-state-commands.md``; this module holds both sides of them (the
target's :func:`execute` and the encoders/decoders the host tools use), so
the layout lives in one place.

A check needs a token in and an answer out.  Rather than a bidirectional
command (which few initiators and transports handle), a check follows the
pattern of EXTENDED COPY / RECEIVE COPY RESULTS: STATE OUT CHECK TOKEN
computes the answer and keeps it for the I_T nexus under a one-byte list
identifier, STATE IN REPORT CHECK RESULT returns it.

Every command calls the same tracker methods as the API's state routes, on
the LUN's worker (the transport runs :func:`execute` there), so a token read
in-band is the token the API returns, and the holds appear in the API.
"""

from __future__ import annotations

import logging
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum

from lunseal.engine.lun import Lun
from lunseal.engine.state.changemap import DEFAULT_GRANULARITY
from lunseal.engine.state.tracker import DEFAULT_HOLD, StateTracker, TrackingMode
from lunseal.errors import (
    CatalogError,
    Conflict,
    InvalidArgument,
    LunsealError,
    LunUnavailable,
    NotFound,
)
from lunseal.frontends.scsi.interface import CHECK_CONDITION, ScsiCommand, ScsiResult

log = logging.getLogger(__name__)

STATE_OUT = 0xC0
STATE_IN = 0xC1
CDB_LENGTH = 12
#: Parameter data header: the string (hold name or token) follows at byte 8.
HEADER = 8
#: Longest parameter list accepted: a header and a hold name of 128 characters
#: of up to 4 UTF-8 bytes each, with room to spare; longer lists are refused
#: before any data is collected.
MAX_PARAMETER_LENGTH = 1024
MAX_STRING = MAX_PARAMETER_LENGTH - HEADER


class OutAction(IntEnum):
    ACQUIRE_HOLD = 0x00
    RELEASE_HOLD = 0x01
    CHECK_TOKEN = 0x02


class InAction(IntEnum):
    READ_TOKEN = 0x00
    REPORT_CHECK_RESULT = 0x01


#: MODE field codes; 0 in ACQUIRE HOLD means "the array's choice" (the API's null).
MODE_CODES: dict[TrackingMode, int] = {
    TrackingMode.COUNTER: 1,
    TrackingMode.TIMESTAMP: 2,
    TrackingMode.FLAG: 3,
}
MODES_BY_CODE = {code: mode for mode, code in MODE_CODES.items()}
MIN_GRANULARITY_EXPONENT = 12
MAX_GRANULARITY_EXPONENT = 30

# Sense keys and additional sense codes used here (SPC-4 4.5.6, 4.5.3).
NOT_READY = 0x02
HARDWARE_ERROR = 0x04
ILLEGAL_REQUEST = 0x05
ABORTED_COMMAND = 0x0B
ASC_PARAMETER_LIST_LENGTH = 0x1A
ASC_INVALID_COMMAND = 0x20
ASC_INVALID_FIELD_IN_CDB = 0x24
ASC_INVALID_FIELD_IN_PARAMETERS = 0x26
ASC_NOT_READY = 0x04
ASC_INVALID_FIELD_IN_IU = 0x0E
ASC_INTERNAL_FAILURE = 0x44
#: Vendor-specific additional sense codes (SPC-4 reserves 80h-FFh for vendors).
ASC_STATE = 0x80
ASCQ_CONFLICT = 0x00
ASCQ_NOT_FOUND = 0x01
ASCQ_CATALOG = 0x02
#: Fixed-format sense: 18 bytes; the additional sense bytes after them carry
#: the array's one-line message (UTF-8), up to the format's 252-byte limit.
SENSE_FIXED = 18
SENSE_MAX = 252


class StateCommandError(Exception):
    """A command refused with CHECK CONDITION; ``sense`` is what the initiator gets."""

    def __init__(self, sense: bytes, message: str) -> None:
        super().__init__(message)
        self.sense = sense
        self.message = message


def sense_data(
    key: int,
    asc: int,
    ascq: int = 0,
    *,
    field: tuple[int, int] | None = None,
    in_cdb: bool = True,
    message: str = "",
) -> bytes:
    """Fixed-format sense (SPC-4 4.5.3), current error.

    ``field`` (byte, bit) fills the sense-key-specific field pointer (SKSV=1,
    C/D=1 for the CDB, 0 for parameter data); ``message`` goes into the
    additional sense bytes, so an initiator can show why without another call.
    """
    extra = message.encode()[: SENSE_MAX - SENSE_FIXED]
    sense = bytearray(SENSE_FIXED)
    sense[0] = 0x70
    sense[2] = key & 0x0F
    sense[7] = SENSE_FIXED - 8 + len(extra)
    sense[12] = asc
    sense[13] = ascq
    if field is not None:
        byte, bit = field
        sense[15] = 0x80 | (0x40 if in_cdb else 0) | 0x08 | (bit & 0x07)
        struct.pack_into(">H", sense, 16, byte)
    return bytes(sense) + extra


def _cdb_field(byte: int, bit: int, message: str) -> StateCommandError:
    sense = sense_data(
        ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_CDB, field=(byte, bit), message=message
    )
    return StateCommandError(sense, message)


def _param_field(byte: int, bit: int, message: str) -> StateCommandError:
    sense = sense_data(
        ILLEGAL_REQUEST,
        ASC_INVALID_FIELD_IN_PARAMETERS,
        field=(byte, bit),
        in_cdb=False,
        message=message,
    )
    return StateCommandError(sense, message)


def _length_error(message: str) -> StateCommandError:
    return StateCommandError(
        sense_data(ILLEGAL_REQUEST, ASC_PARAMETER_LIST_LENGTH, message=message), message
    )


def error_sense(exc: LunsealError, *, string_at: int = HEADER) -> bytes:
    """Sense for an error the tracker raised; the message travels with it."""
    msg = exc.message
    if isinstance(exc, InvalidArgument):
        return _param_field(string_at, 7, msg).sense
    if isinstance(exc, LunUnavailable):
        return sense_data(NOT_READY, ASC_NOT_READY, 0x03, message=msg)
    if isinstance(exc, Conflict):
        return sense_data(ILLEGAL_REQUEST, ASC_STATE, ASCQ_CONFLICT, message=msg)
    if isinstance(exc, NotFound):
        return sense_data(ILLEGAL_REQUEST, ASC_STATE, ASCQ_NOT_FOUND, message=msg)
    if isinstance(exc, CatalogError):
        return sense_data(ABORTED_COMMAND, ASC_STATE, ASCQ_CATALOG, message=msg)
    return sense_data(HARDWARE_ERROR, ASC_INTERNAL_FAILURE, message=msg)


# -- the CDBs ------------------------------------------------------------------------


@dataclass(frozen=True)
class StateCdb:
    opcode: int
    action: int
    list_id: int
    length: int


def parse_cdb(cdb: bytes) -> StateCdb:
    """Decode and check a STATE IN/OUT CDB (bytes beyond 12 are the transport's padding)."""
    if len(cdb) < CDB_LENGTH:
        raise _cdb_field(0, 7, f"a state command CDB is {CDB_LENGTH} bytes, got {len(cdb)}")
    opcode, action = cdb[0], cdb[1] & 0x1F
    if opcode not in (STATE_IN, STATE_OUT):
        message = f"operation code {opcode:#04x} is not supported"
        sense = sense_data(ILLEGAL_REQUEST, ASC_INVALID_COMMAND, field=(0, 7), message=message)
        raise StateCommandError(sense, message)
    if cdb[1] & 0xE0:
        raise _cdb_field(1, 7, "reserved bits of byte 1 are set")
    actions: set[int] = set(OutAction) if opcode == STATE_OUT else set(InAction)
    if action not in actions:
        raise _cdb_field(1, 4, f"unknown service action {action:#04x} of opcode {opcode:#04x}")
    check = opcode == STATE_OUT and action == OutAction.CHECK_TOKEN
    result = opcode == STATE_IN and action == InAction.REPORT_CHECK_RESULT
    if cdb[2] and not (check or result):
        raise _cdb_field(2, 7, "the list identifier is only for CHECK TOKEN and its result")
    for i in (3, 4, 5, 10):
        if cdb[i]:
            raise _cdb_field(i, 7, f"reserved byte {i} of the CDB is not zero")
    (length,) = struct.unpack_from(">I", cdb, 6)
    return StateCdb(opcode, action, cdb[2], length)


def data_out_length(cdb: bytes) -> int:
    """How many data-out bytes a state command asks for (the transport collects
    no more; an oversized or malformed CDB asks for none and fails in :func:`execute`)."""
    try:
        parsed = parse_cdb(cdb)
    except StateCommandError:
        return 0
    if parsed.opcode != STATE_OUT or parsed.length > MAX_PARAMETER_LENGTH:
        return 0
    return parsed.length


def state_out_cdb(action: OutAction, length: int, list_id: int = 0) -> bytes:
    return struct.pack(">BBB3xIxx", STATE_OUT, action, list_id, length)


def state_in_cdb(action: InAction, allocation: int, list_id: int = 0) -> bytes:
    return struct.pack(">BBB3xIxx", STATE_IN, action, list_id, allocation)


# -- parameter data ---------------------------------------------------------------------


@dataclass(frozen=True)
class HoldRequest:
    name: str = DEFAULT_HOLD
    mode: TrackingMode | None = None
    #: Change-map region size; ``None``: no change map.
    granularity: int | None = None


def acquire_parameters(req: HoldRequest) -> bytes:
    mode = 0 if req.mode is None else MODE_CODES[req.mode]
    flags, exponent = 0, 0
    if req.granularity is not None:
        flags = 0x01
        exponent = req.granularity.bit_length() - 1
        if 1 << exponent != req.granularity:
            raise InvalidArgument(f"granularity {req.granularity} is not a power of two")
    return _with_string(bytes([mode, flags, exponent, 0]), req.name)


def string_parameters(text: str) -> bytes:
    """RELEASE HOLD (a hold name) and CHECK TOKEN (a token)."""
    return _with_string(bytes(4), text)


def _with_string(head: bytes, text: str) -> bytes:
    raw = text.encode()
    if len(raw) > MAX_STRING:
        raise InvalidArgument(f"{text[:40]!r}... is longer than {MAX_STRING} bytes")
    return head + struct.pack(">H2x", len(raw)) + raw


def _parameters(cdb: StateCdb, data: bytes) -> tuple[bytes, str]:
    """The header and the string of a STATE OUT parameter list."""
    if cdb.length > MAX_PARAMETER_LENGTH:
        raise _cdb_field(6, 7, f"parameter list length {cdb.length} exceeds {MAX_PARAMETER_LENGTH}")
    if cdb.length < HEADER:
        raise _length_error(f"parameter list of {cdb.length} bytes; at least {HEADER} needed")
    if len(data) < cdb.length:
        # The transport's expected length and the CDB disagree (as for WRITE).
        message = (
            f"the CDB announces {cdb.length} bytes of parameters, the initiator sent {len(data)}"
        )
        sense = sense_data(ILLEGAL_REQUEST, ASC_INVALID_FIELD_IN_IU, 0x03, message=message)
        raise StateCommandError(sense, message)
    data = data[: cdb.length]
    (n,) = struct.unpack_from(">H", data, 4)
    if HEADER + n > len(data):
        raise _length_error(f"string of {n} bytes does not fit the {len(data)}-byte list")
    for i in (6, 7, *range(HEADER + n, len(data))):
        if data[i]:
            raise _param_field(i, 7, f"reserved byte {i} of the parameter list is not zero")
    try:
        text = data[HEADER : HEADER + n].decode()
    except UnicodeDecodeError:
        raise _param_field(HEADER, 7, "the string is not UTF-8") from None
    return data[:4], text


def _hold_request(head: bytes, name: str) -> HoldRequest:
    mode_code, flags, exponent, reserved = head
    if mode_code and mode_code not in MODES_BY_CODE:
        raise _param_field(0, 7, f"unknown tracking mode code {mode_code}")
    if flags & 0xFE or reserved:
        raise _param_field(1 if flags & 0xFE else 3, 7, "reserved bits are set")
    granularity = None
    if flags & 0x01:
        if exponent and not MIN_GRANULARITY_EXPONENT <= exponent <= MAX_GRANULARITY_EXPONENT:
            raise _param_field(2, 7, f"granularity exponent {exponent} is not 12-30 (4K-1G)")
        granularity = 1 << exponent if exponent else DEFAULT_GRANULARITY
    elif exponent:
        raise _param_field(2, 7, "a granularity without TRACK CHANGES")
    return HoldRequest(name or DEFAULT_HOLD, MODES_BY_CODE.get(mode_code), granularity)


# -- response data ------------------------------------------------------------------------


@dataclass(frozen=True)
class HoldToken:
    name: str
    token: str
    granularity: int | None


@dataclass(frozen=True)
class TokenReport:
    tracking: bool
    clean: bool
    mode: TrackingMode
    token: str | None
    holds: list[HoldToken] = field(default_factory=list)


@dataclass(frozen=True)
class CheckReport:
    intact: bool
    reason: str
    current: str | None


def encode_token_report(report: TokenReport) -> bytes:
    token = (report.token or "").encode()
    body = bytearray()
    body += bytes([int(report.tracking) | int(report.clean) << 1, MODE_CODES[report.mode]])
    body += struct.pack(">H", len(token)) + token
    for hold in report.holds:
        name, tok = hold.name.encode(), hold.token.encode()
        exponent = 0 if hold.granularity is None else hold.granularity.bit_length() - 1
        body += struct.pack(">HHB3x", len(name), len(tok), exponent) + name + tok
    return struct.pack(">I", len(body)) + body


def decode_token_report(data: bytes) -> TokenReport:
    """Parse READ TOKEN data; a truncated answer is an error (ask with a larger allocation)."""
    body = _body(data)
    if len(body) < 4:
        raise InvalidArgument("READ TOKEN data is too short")
    flags, mode_code, t = body[0], body[1], struct.unpack_from(">H", body, 2)[0]
    mode = MODES_BY_CODE.get(mode_code)
    if mode is None or 4 + t > len(body):
        raise InvalidArgument("READ TOKEN data is malformed")
    token = _text(body[4 : 4 + t]) or None
    holds, i = [], 4 + t
    while i < len(body):
        if i + 8 > len(body):
            raise InvalidArgument("READ TOKEN hold descriptor is truncated")
        n, k, exponent = struct.unpack_from(">HHB", body, i)
        if i + 8 + n + k > len(body):
            raise InvalidArgument("READ TOKEN hold descriptor is truncated")
        name = _text(body[i + 8 : i + 8 + n])
        tok = _text(body[i + 8 + n : i + 8 + n + k])
        holds.append(HoldToken(name, tok, (1 << exponent) if exponent else None))
        i += 8 + n + k
    return TokenReport(bool(flags & 1), bool(flags & 2), mode, token, holds)


def encode_check_report(report: CheckReport) -> bytes:
    reason, current = report.reason.encode(), (report.current or "").encode()
    body = struct.pack(">BxHH2x", 0 if report.intact else 1, len(reason), len(current))
    body += reason + current
    return struct.pack(">I", len(body)) + body


def decode_check_report(data: bytes) -> CheckReport:
    body = _body(data)
    if len(body) < 8:
        raise InvalidArgument("REPORT CHECK RESULT data is too short")
    result, r, c = struct.unpack_from(">BxHH", body)
    if result > 1 or 8 + r + c > len(body):
        raise InvalidArgument("REPORT CHECK RESULT data is malformed")
    reason = _text(body[8 : 8 + r])
    current = _text(body[8 + r : 8 + r + c]) or None
    return CheckReport(result == 0, reason, current)


def _text(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("state command data holds a string that is not UTF-8") from None


def _body(data: bytes) -> bytes:
    if len(data) < 4:
        raise InvalidArgument("state command data is shorter than its header")
    (n,) = struct.unpack_from(">I", data)
    if len(data) < 4 + n:
        raise InvalidArgument(f"state command data truncated: {len(data) - 4} of {n} bytes")
    return bytes(data[4 : 4 + n])


# -- check results kept per I_T nexus ---------------------------------------------------------


class CheckResults:
    """Answers of CHECK TOKEN until REPORT CHECK RESULT reads them.

    Bounded: at most :attr:`per_nexus` answers per I_T nexus (the oldest of that
    nexus go first, so one initiator cannot push out another's) and
    :attr:`limit` in all.  Workers of different LUNs use it at once: locked.
    """

    def __init__(self, limit: int = 4096, per_nexus: int = 256) -> None:
        self.limit = limit
        self.per_nexus = per_nexus
        self._lock = threading.Lock()
        self._results: OrderedDict[tuple[str, str, str, int], CheckReport] = OrderedDict()

    def put(self, key: tuple[str, str, str, int], report: CheckReport) -> None:
        with self._lock:
            self._results.pop(key, None)
            mine = [k for k in self._results if k[:2] == key[:2]]
            for old in mine[: max(0, len(mine) - self.per_nexus + 1)]:
                del self._results[old]
            while len(self._results) >= self.limit:
                self._results.popitem(last=False)
            self._results[key] = report

    def get(self, key: tuple[str, str, str, int]) -> CheckReport | None:
        with self._lock:
            return self._results.get(key)

    def forget(self, initiator_port: str, target_port: str) -> None:
        """The nexus is gone (session ended): its answers go too."""
        with self._lock:
            for key in [k for k in self._results if k[:2] == (initiator_port, target_port)]:
                del self._results[key]

    def __len__(self) -> int:
        return len(self._results)


RESULTS = CheckResults()


def nexus_gone(initiator_port: str, target_port: str) -> None:
    RESULTS.forget(initiator_port, target_port)


# -- the target side ------------------------------------------------------------------------


def tracker_of(lun: Lun) -> StateTracker:
    """The LUN's state tracker.  The hook gets the LUN only; the tracker hooks
    itself into the LUN's change gate, so it is found there."""
    for listener in lun.listeners:
        owner = getattr(listener, "__self__", None)
        if isinstance(owner, StateTracker):
            return owner
    lun.require_available()
    raise LunUnavailable(f"LUN {lun.name} has no state tracking")


#: Records one in-band command: (actor, action, target, result, detail).
AuditHook = Callable[[str, str, str, str, str], None]


def execute(lun: Lun, cmd: ScsiCommand, audit: AuditHook | None = None) -> ScsiResult:
    """Run a STATE IN/OUT command on ``lun``; on the LUN's worker, never raises."""
    cdb: StateCdb | None = None
    try:
        cdb = parse_cdb(bytes(cmd.cdb))
        data = _run(lun, cmd, cdb)
    except StateCommandError as exc:
        _audit(audit, lun, cmd, cdb, "refused", exc.message)
        return ScsiResult(CHECK_CONDITION, sense=exc.sense)
    except LunsealError as exc:
        log.info("LUN %s: in-band state command from %s refused: %s", lun.name, _who(cmd), exc)
        _audit(audit, lun, cmd, cdb, "refused", exc.message)
        return ScsiResult(CHECK_CONDITION, sense=error_sense(exc))
    _audit(audit, lun, cmd, cdb, "ok", "")
    if cdb.opcode == STATE_IN:
        data = data[: cdb.length]
    return ScsiResult(data=data)


def _audit(
    audit: AuditHook | None,
    lun: Lun,
    cmd: ScsiCommand,
    cdb: StateCdb | None,
    result: str,
    detail: str,
) -> None:
    if audit is None:
        return
    if cdb is None:
        action = f"iSCSI {bytes(cmd.cdb[:1]).hex()}h"
    elif cdb.opcode == STATE_OUT:
        action = f"iSCSI STATE OUT {OutAction(cdb.action).name}"
    else:
        action = f"iSCSI STATE IN {InAction(cdb.action).name}"
    where = f"{cmd.nexus.initiator_port} from {cmd.nexus.address or '?'}"
    audit(
        f"iscsi:{cmd.nexus.initiator_name}",
        action,
        f"lun={lun.name}",
        result,
        f"{where}; {detail}" if detail else where,
    )


def _who(cmd: ScsiCommand) -> str:
    return f"iSCSI initiator {cmd.nexus.initiator_port}"


def _run(lun: Lun, cmd: ScsiCommand, cdb: StateCdb) -> bytes:
    tracker = tracker_of(lun)
    if cdb.opcode == STATE_OUT:
        _state_out(tracker, cmd, cdb)
        return b""
    if cdb.action == InAction.READ_TOKEN:
        return encode_token_report(token_report(tracker))
    return encode_check_report(_stored_result(lun, cmd, cdb))


def _state_out(tracker: StateTracker, cmd: ScsiCommand, cdb: StateCdb) -> None:
    lun = tracker.lun
    head, text = _parameters(cdb, bytes(cmd.data_out))
    if cdb.action == OutAction.ACQUIRE_HOLD:
        req = _hold_request(head, text)
        tracker.acquire(req.name, mode=req.mode, granularity=req.granularity)
        log.info("LUN %s: hold %r acquired in-band by %s", lun.name, req.name, _who(cmd))
        return
    _no_fields(head)
    if cdb.action == OutAction.RELEASE_HOLD:
        name = text or DEFAULT_HOLD
        tracker.release(name)
        log.info("LUN %s: hold %r released in-band by %s", lun.name, name, _who(cmd))
        return
    outcome = tracker.check(text)
    log.info("LUN %s: token checked in-band by %s: intact=%s", lun.name, _who(cmd), outcome.intact)
    report = CheckReport(outcome.intact, outcome.reason, outcome.current)
    RESULTS.put(_result_key(lun, cmd, cdb), report)


def _no_fields(head: bytes) -> None:
    """RELEASE HOLD and CHECK TOKEN use none of the header's first four bytes."""
    for i, byte in enumerate(head):
        if byte:
            raise _param_field(i, 7, f"reserved byte {i} of the parameter list is not zero")


def token_report(tracker: StateTracker) -> TokenReport:
    """What GET /v1/luns/{lun}/state says, in-band: the token only while tracking."""
    token = tracker.token() if tracker.tracking else None  # may move to a new epoch first
    s = tracker.state
    holds = [
        HoldToken(h.name, h.token, None if h.changes is None else h.changes.granularity)
        for h in tracker.holds.values()
    ]
    return TokenReport(tracker.tracking, s.clean, s.mode, token, holds)


def _result_key(lun: Lun, cmd: ScsiCommand, cdb: StateCdb) -> tuple[str, str, str, int]:
    return (cmd.nexus.initiator_port, cmd.nexus.target_port, lun.record.uuid, cdb.list_id)


def _stored_result(lun: Lun, cmd: ScsiCommand, cdb: StateCdb) -> CheckReport:
    report = RESULTS.get(_result_key(lun, cmd, cdb))
    if report is None:
        raise _cdb_field(
            2, 7, f"no CHECK TOKEN result under list identifier {cdb.list_id} for this nexus"
        )
    return report
