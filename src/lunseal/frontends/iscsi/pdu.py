"""Sans-I/O iSCSI PDU codec (RFC 7143 section 11): bytes in, PDUs out; builders for bytes back.

A PDU is a 48-byte Basic Header Segment (BHS), optional Additional Header
Segments (AHS, ``TotalAHSLength`` 4-byte words), a header digest when
negotiated, a data segment padded to 4 bytes and a data digest when negotiated.

:class:`PduDecoder` is fed bytes (``receive_data``, or zero-copy with
``get_buffer`` + ``buffer_updated`` as ``asyncio.BufferedProtocol`` does) and
yields whole PDUs from :meth:`PduDecoder.next_pdu`.  It parses lazily, one PDU
per call, so digests switched on after the last login response apply exactly
from the next PDU on.  Anything it cannot frame raises :class:`PduError`: the
connection cannot be resynchronised, so the caller sends the Reject the error
carries (if any) and closes that connection.

Bound: the decoder never holds more than one PDU of at most
:meth:`PduDecoder.max_pdu_size` bytes plus one receive of slack, because a
data segment longer than ``max_data`` is refused from its header alone.

The builders (``nop_in``, ``scsi_response``, ... for the target; ``nop_out``,
``scsi_command``, ... for the initiator) return the bytes of one whole PDU,
digests included when asked for.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from crc32c import crc32c

from lunseal.errors import ProtocolError

# -- opcodes ------------------------------------------------------------------
# Initiator to target.
NOP_OUT = 0x00
SCSI_COMMAND = 0x01
TASK_MGMT = 0x02
LOGIN = 0x03
TEXT = 0x04
DATA_OUT = 0x05
LOGOUT = 0x06
SNACK = 0x10
# Target to initiator.
NOP_IN = 0x20
SCSI_RESPONSE = 0x21
TASK_MGMT_RESPONSE = 0x22
LOGIN_RESPONSE = 0x23
TEXT_RESPONSE = 0x24
DATA_IN = 0x25
LOGOUT_RESPONSE = 0x26
R2T = 0x31
ASYNC_MESSAGE = 0x32
REJECT = 0x3F

INITIATOR_OPCODES = frozenset(
    {NOP_OUT, SCSI_COMMAND, TASK_MGMT, LOGIN, TEXT, DATA_OUT, LOGOUT, SNACK}
)
TARGET_OPCODES = frozenset(
    {
        NOP_IN,
        SCSI_RESPONSE,
        TASK_MGMT_RESPONSE,
        LOGIN_RESPONSE,
        TEXT_RESPONSE,
        DATA_IN,
        LOGOUT_RESPONSE,
        R2T,
        ASYNC_MESSAGE,
        REJECT,
    }
)

# -- flags (byte 1) -------------------------------------------------------------
F_FINAL = 0x80
# SCSI Command.
F_READ = 0x40
F_WRITE = 0x20
ATTR_SIMPLE = 0x01
# Login (T, C, CSG, NSG) and Text (C).
F_TRANSIT = 0x80
F_CONTINUE = 0x40
# Data-In.
F_ACK = 0x40
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_STATUS = 0x01

# Login stages.
SECURITY_STAGE = 0
OPERATIONAL_STAGE = 1
FULL_FEATURE_PHASE = 3

# Reject reasons (RFC 7143 11.17.1).
REJECT_DATA_DIGEST = 0x02
REJECT_SNACK = 0x03
REJECT_PROTOCOL_ERROR = 0x04
REJECT_NOT_SUPPORTED = 0x05
REJECT_IMMEDIATE_REJECTED = 0x06
REJECT_TASK_IN_PROGRESS = 0x07
REJECT_INVALID_DATA_ACK = 0x08
REJECT_INVALID_FIELD = 0x09
REJECT_OUT_OF_RESOURCES = 0x0A
REJECT_WAITING_FOR_LOGOUT = 0x0C

RESERVED_TAG = 0xFFFFFFFF
BHS_SIZE = 48
DIGEST_SIZE = 4
#: MaxRecvDataSegmentLength in force until login completes (RFC 7143 13.12).
LOGIN_MAX_DATA = 8192
#: The largest AHS a header can announce (TotalAHSLength is one byte of words).
MAX_AHS = 255 * 4

_U32 = struct.Struct(">I")
_BHS_HEAD = struct.Struct(">BBBBI8sI")  # opcode, flags, b2, b3, ahs words+dlen, lun, itt
_BHS_WORDS = struct.Struct(">BBBBI8sI7I")  # the same and bytes 20..47 as seven words

_INITIAL_BUFFER = 64 << 10
_NO_LUN = bytes(8)


class PduError(ProtocolError):
    """A PDU that cannot be framed or trusted; the connection is closed.

    ``reject_reason`` is the Reject reason to send first (``None``: close
    without a Reject, e.g. after a header digest error, when nothing in the
    header can be trusted); ``header`` is the offending BHS for the Reject.
    """

    def __init__(self, message: str, reject_reason: int | None = None, header: bytes = b"") -> None:
        super().__init__(message)
        self.reject_reason = reject_reason
        self.header = header


@dataclass(slots=True)
class Pdu:
    """One decoded PDU.  ``bhs`` is the raw 48-byte header; the properties
    read the fields common to most PDUs."""

    bhs: bytes
    ahs: bytes = b""
    data: bytes = b""

    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & 0x40)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & F_FINAL)

    @property
    def lun_field(self) -> bytes:
        return self.bhs[8:16]

    @property
    def itt(self) -> int:
        return self.u32(16)

    def u32(self, offset: int) -> int:
        return int(_U32.unpack_from(self.bhs, offset)[0])

    def u16(self, offset: int) -> int:
        return int.from_bytes(self.bhs[offset : offset + 2], "big")

    # Initiator PDUs: word 20 is the TTT (NOP-Out, Text, Data-Out) or EDTL (SCSI
    # Command); CmdSN at 24 (ExpStatSN of Data-Out... is at 28 for all of them).
    @property
    def ttt(self) -> int:
        return self.u32(20)

    @property
    def cmdsn(self) -> int:
        return self.u32(24)

    @property
    def exp_statsn(self) -> int:
        return self.u32(28)

    # Target PDUs.
    @property
    def statsn(self) -> int:
        return self.u32(24)

    @property
    def exp_cmdsn(self) -> int:
        return self.u32(28)

    @property
    def max_cmdsn(self) -> int:
        return self.u32(32)


def data_segment_length(bhs: bytes | bytearray | memoryview) -> int:
    return int.from_bytes(bhs[5:8], "big")


def padded(n: int) -> int:
    return (n + 3) & ~3


def lun_number(field: bytes) -> int | None:
    """The LUN a SAM-5 8-byte LUN field addresses (peripheral or flat space
    addressing, single level); ``None`` for any other form."""
    method = field[0] >> 6
    if any(field[2:]):
        return None
    if method == 0:
        return field[1] if field[0] == 0 else None
    if method == 1:
        return ((field[0] & 0x3F) << 8) | field[1]
    return None


def lun_field(number: int) -> bytes:
    """The 8-byte LUN field for a LUN number (peripheral below 256, else flat)."""
    if number < 256:
        return bytes([0, number]) + bytes(6)
    return bytes([0x40 | (number >> 8) & 0x3F, number & 0xFF]) + bytes(6)


def _digest(data: bytes | bytearray | memoryview) -> bytes:
    # RFC 7143 puts the CRC32C on the wire least significant byte first.
    return int(crc32c(data)).to_bytes(4, "little")


class PduDecoder:
    """Frames PDUs out of a byte stream (either direction)."""

    def __init__(
        self, *, max_data: int = LOGIN_MAX_DATA, expect: frozenset[int] = INITIATOR_OPCODES
    ) -> None:
        #: Our MaxRecvDataSegmentLength: longer data segments are refused.
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self.expect = expect
        self._buf = bytearray(_INITIAL_BUFFER)
        self._start = 0
        self._end = 0

    def max_pdu_size(self) -> int:
        return BHS_SIZE + MAX_AHS + 2 * DIGEST_SIZE + padded(self.max_data)

    # -- input ------------------------------------------------------------------

    def get_buffer(self, sizehint: int = -1) -> memoryview:
        need = max(sizehint, 16 << 10)
        if len(self._buf) - self._end < need:
            self._compact(need)
        return memoryview(self._buf)[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        self._end += nbytes

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        while view:
            target = self.get_buffer(len(view))
            n = min(len(target), len(view))
            target[:n] = view[:n]
            self.buffer_updated(n)
            view = view[n:]

    @property
    def buffered(self) -> int:
        """Received bytes not yet returned as PDUs."""
        return self._end - self._start

    @property
    def capacity(self) -> int:
        return len(self._buf)

    def _compact(self, need: int) -> None:
        pending = self._end - self._start
        # A drained decoder holds less than one PDU, so the buffer stays below
        # one maximal PDU plus one receive.
        want = max(_INITIAL_BUFFER, pending + need)
        if want > len(self._buf) or len(self._buf) > 2 * max(want, _INITIAL_BUFFER):
            new = bytearray(want)
            new[:pending] = self._buf[self._start : self._end]
            self._buf = new
        elif pending:
            self._buf[:pending] = self._buf[self._start : self._end]
        self._start, self._end = 0, pending

    # -- framing ------------------------------------------------------------------

    def next_pdu(self) -> Pdu | None:
        """The next whole PDU, or ``None`` until more bytes arrive."""
        avail = self._end - self._start
        if avail < BHS_SIZE:
            return None
        buf = self._buf
        s = self._start
        bhs = bytes(buf[s : s + BHS_SIZE])
        ahs_len = bhs[4] * 4
        head_len = BHS_SIZE + ahs_len + (DIGEST_SIZE if self.header_digest else 0)
        if avail < head_len:
            return None
        if self.header_digest:
            got = bytes(buf[s + BHS_SIZE + ahs_len : s + head_len])
            if got != _digest(buf[s : s + BHS_SIZE + ahs_len]):
                # Nothing in this header, its length least of all, can be trusted.
                raise PduError("header digest error")
        opcode = bhs[0] & 0x3F
        if opcode not in self.expect:
            raise PduError(f"unknown opcode 0x{opcode:02x}", REJECT_PROTOCOL_ERROR, bhs)
        dlen = data_segment_length(bhs)
        if dlen > self.max_data:
            raise PduError(
                f"data segment of {dlen} bytes exceeds MaxRecvDataSegmentLength {self.max_data}",
                REJECT_PROTOCOL_ERROR,
                bhs,
            )
        total = head_len + padded(dlen) + (DIGEST_SIZE if self.data_digest and dlen else 0)
        if avail < total:
            return None
        data_at = s + head_len
        data = bytes(buf[data_at : data_at + dlen])
        if self.data_digest and dlen:
            end = data_at + padded(dlen)
            if bytes(buf[end : end + DIGEST_SIZE]) != _digest(buf[data_at:end]):
                raise PduError("data digest error", REJECT_DATA_DIGEST, bhs)
        ahs = bytes(buf[s + BHS_SIZE : s + BHS_SIZE + ahs_len])
        self._start += total
        if self._start == self._end:
            self._start = self._end = 0
        return Pdu(bhs, ahs, data)


# -- encoding -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Digests:
    header: bool = False
    data: bool = False


NO_DIGESTS = Digests()


Wire = list[bytes | bytearray | memoryview]


def build_parts(
    opcode: int,
    flags: int,
    *,
    immediate: bool = False,
    b2: int = 0,
    b3: int = 0,
    lun: bytes = bytes(8),
    itt: int = RESERVED_TAG,
    words: tuple[int, ...] = (),
    tail: bytes | None = None,
    ahs: bytes = b"",
    data: bytes | bytearray | memoryview = b"",
    digests: Digests = NO_DIGESTS,
) -> Wire:
    """One whole PDU as pieces for ``writelines``: the data segment is not
    copied.  ``words`` are bytes 20..47 as big-endian words (missing ones are
    zero); ``tail`` gives those 28 bytes raw instead."""
    if len(ahs) % 4 or len(ahs) > MAX_AHS:
        raise ValueError("AHS must be whole words, at most 1020 bytes")
    first = opcode | (0x40 if immediate else 0)
    dlen = len(data)
    lengths = (len(ahs) << 22) | dlen  # TotalAHSLength in words, then 3 bytes of length
    if tail is None:
        # The common case in one pack: this runs once per PDU on the event loop.
        if len(words) < 7:
            words += (0,) * (7 - len(words))
        head = _BHS_WORDS.pack(first, flags, b2, b3, lengths, lun, itt, *words)
    else:
        head = _BHS_HEAD.pack(first, flags, b2, b3, lengths, lun, itt) + tail
    if ahs:
        head += ahs
    if digests.header:
        head += _digest(head)
    if not dlen:
        return [head]
    pad = bytes(padded(dlen) - dlen)
    if digests.data:
        crc = crc32c(pad, crc32c(data))
        return [head, data, pad + int(crc).to_bytes(4, "little")]
    return [head, data, pad] if pad else [head, data]


def build(
    opcode: int,
    flags: int,
    *,
    immediate: bool = False,
    b2: int = 0,
    b3: int = 0,
    lun: bytes = bytes(8),
    itt: int = RESERVED_TAG,
    words: tuple[int, ...] = (),
    tail: bytes | None = None,
    ahs: bytes = b"",
    data: bytes | bytearray | memoryview = b"",
    digests: Digests = NO_DIGESTS,
) -> bytes:
    """One whole PDU as bytes (see :func:`build_parts`)."""
    parts = build_parts(
        opcode,
        flags,
        immediate=immediate,
        b2=b2,
        b3=b3,
        lun=lun,
        itt=itt,
        words=words,
        tail=tail,
        ahs=ahs,
        data=data,
        digests=digests,
    )
    head = parts[0]
    if len(parts) == 1 and isinstance(head, bytes):
        return head  # no data segment: nothing to join
    return b"".join(parts)


def _u16pair(a: int, b: int) -> int:
    return (a << 16) | b


# Target PDUs. -----------------------------------------------------------------------


def nop_in(
    *,
    itt: int,
    ttt: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    lun: bytes = bytes(8),
    data: bytes = b"",
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        NOP_IN,
        F_FINAL,
        lun=lun,
        itt=itt,
        words=(ttt, statsn, exp_cmdsn, max_cmdsn),
        data=data,
        digests=digests,
    )


def scsi_response(
    *,
    itt: int,
    status: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    residual_flags: int = 0,
    residual: int = 0,
    response: int = 0,
    sense: bytes = b"",
    exp_datasn: int = 0,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    data = len(sense).to_bytes(2, "big") + sense if sense else b""
    return build(
        SCSI_RESPONSE,
        F_FINAL | residual_flags,
        b2=response,
        b3=status,
        itt=itt,
        words=(0, statsn, exp_cmdsn, max_cmdsn, exp_datasn, 0, residual),
        data=data,
        digests=digests,
    )


def scsi_status(
    itt: int,
    status: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    residual_flags: int,
    residual: int,
    exp_datasn: int,
    digests: Digests,
) -> bytes:
    """A SCSI Response without sense data, built in one pack: the hot path of
    every command that moves no data-in (writes above all)."""
    head = _BHS_WORDS.pack(
        SCSI_RESPONSE,
        F_FINAL | residual_flags,
        0,
        status,
        0,
        _NO_LUN,
        itt,
        0,
        statsn,
        exp_cmdsn,
        max_cmdsn,
        exp_datasn,
        0,
        residual,
    )
    return head + _digest(head) if digests.header else head


def task_mgmt_response(
    *,
    itt: int,
    response: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        TASK_MGMT_RESPONSE,
        F_FINAL,
        b2=response,
        itt=itt,
        words=(0, statsn, exp_cmdsn, max_cmdsn),
        digests=digests,
    )


def login_response(
    *,
    flags: int,
    isid: bytes,
    tsih: int,
    itt: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    status_class: int = 0,
    status_detail: int = 0,
    data: bytes = b"",
    version_max: int = 0,
    version_active: int = 0,
) -> bytes:
    # Login PDUs never carry digests (they are negotiated by the login).
    return build(
        LOGIN_RESPONSE,
        flags,
        b2=version_max,
        b3=version_active,
        lun=isid + tsih.to_bytes(2, "big"),
        itt=itt,
        words=(0, statsn, exp_cmdsn, max_cmdsn, ((status_class << 8) | status_detail) << 16),
        data=data,
    )


def text_response(
    *,
    flags: int,
    itt: int,
    ttt: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    data: bytes = b"",
    lun: bytes = bytes(8),
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        TEXT_RESPONSE,
        flags,
        lun=lun,
        itt=itt,
        words=(ttt, statsn, exp_cmdsn, max_cmdsn),
        data=data,
        digests=digests,
    )


def data_in(
    *,
    itt: int,
    datasn: int,
    offset: int,
    data: bytes | bytearray | memoryview,
    exp_cmdsn: int,
    max_cmdsn: int,
    final: bool = False,
    status: int | None = None,
    statsn: int = 0,
    residual_flags: int = 0,
    residual: int = 0,
    lun: bytes = bytes(8),
    digests: Digests = NO_DIGESTS,
) -> Wire:
    """A Data-In as pieces (its data is not copied); with ``status`` it carries
    the command's status (S bit; F set too)."""
    flags = F_FINAL if final else 0
    b3 = 0
    if status is not None:
        flags |= F_FINAL | F_STATUS | residual_flags
        b3 = status
    else:
        statsn = residual = 0
    return build_parts(
        DATA_IN,
        flags,
        b3=b3,
        lun=lun,
        itt=itt,
        words=(RESERVED_TAG, statsn, exp_cmdsn, max_cmdsn, datasn, offset, residual),
        data=data,
        digests=digests,
    )


def logout_response(
    *,
    itt: int,
    response: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    time2wait: int = 0,
    time2retain: int = 0,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        LOGOUT_RESPONSE,
        F_FINAL,
        b2=response,
        itt=itt,
        words=(0, statsn, exp_cmdsn, max_cmdsn, 0, _u16pair(time2wait, time2retain)),
        digests=digests,
    )


def r2t(
    *,
    itt: int,
    ttt: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    r2tsn: int,
    offset: int,
    length: int,
    lun: bytes = bytes(8),
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        R2T,
        F_FINAL,
        lun=lun,
        itt=itt,
        words=(ttt, statsn, exp_cmdsn, max_cmdsn, r2tsn, offset, length),
        digests=digests,
    )


def async_message(
    *,
    event: int,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    vcode: int = 0,
    parameters: tuple[int, int, int] = (0, 0, 0),
    lun: bytes = bytes(8),
    data: bytes = b"",
    digests: Digests = NO_DIGESTS,
) -> bytes:
    p1, p2, p3 = parameters
    tail = struct.pack(">IIIIBBHHHI", 0, statsn, exp_cmdsn, max_cmdsn, event, vcode, p1, p2, p3, 0)
    return build(
        ASYNC_MESSAGE, F_FINAL, lun=lun, itt=RESERVED_TAG, tail=tail, data=data, digests=digests
    )


def reject(
    *,
    reason: int,
    header: bytes,
    statsn: int,
    exp_cmdsn: int,
    max_cmdsn: int,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        REJECT,
        F_FINAL,
        b2=reason,
        itt=RESERVED_TAG,
        words=(0, statsn, exp_cmdsn, max_cmdsn),
        data=header[:BHS_SIZE],
        digests=digests,
    )


# Initiator PDUs. ------------------------------------------------------------------------


def nop_out(
    *,
    itt: int,
    ttt: int = RESERVED_TAG,
    cmdsn: int,
    exp_statsn: int,
    lun: bytes = bytes(8),
    data: bytes = b"",
    immediate: bool = True,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        NOP_OUT,
        F_FINAL,
        immediate=immediate,
        lun=lun,
        itt=itt,
        words=(ttt, cmdsn, exp_statsn),
        data=data,
        digests=digests,
    )


def scsi_command(
    *,
    itt: int,
    lun: bytes,
    cdb: bytes,
    cmdsn: int,
    exp_statsn: int,
    expected_length: int,
    read: bool = False,
    write: bool = False,
    final: bool = True,
    data: bytes = b"",
    immediate: bool = False,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    if len(cdb) > 16:
        raise ValueError("CDBs longer than 16 bytes need an extended-CDB AHS")
    flags = (F_FINAL if final else 0) | (F_READ if read else 0) | (F_WRITE if write else 0)
    tail = struct.pack(">III", expected_length, cmdsn, exp_statsn) + cdb.ljust(16, b"\0")
    return build(
        SCSI_COMMAND,
        flags | ATTR_SIMPLE,
        immediate=immediate,
        lun=lun,
        itt=itt,
        tail=tail,
        data=data,
        digests=digests,
    )


def task_mgmt(
    *,
    function: int,
    itt: int,
    cmdsn: int,
    exp_statsn: int,
    lun: bytes = bytes(8),
    referenced_itt: int = RESERVED_TAG,
    ref_cmdsn: int = 0,
    immediate: bool = True,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        TASK_MGMT,
        F_FINAL | function,
        immediate=immediate,
        lun=lun,
        itt=itt,
        words=(referenced_itt, cmdsn, exp_statsn, ref_cmdsn),
        digests=digests,
    )


def login_request(
    *,
    isid: bytes,
    tsih: int,
    itt: int,
    cid: int,
    cmdsn: int,
    exp_statsn: int,
    csg: int,
    nsg: int,
    transit: bool,
    data: bytes = b"",
    cont: bool = False,
) -> bytes:
    flags = (F_TRANSIT if transit else 0) | (F_CONTINUE if cont else 0) | (csg << 2) | nsg
    return build(
        LOGIN,
        flags,
        immediate=True,
        lun=isid + tsih.to_bytes(2, "big"),
        itt=itt,
        words=(cid << 16, cmdsn, exp_statsn),
        data=data,
    )


def text_request(
    *,
    itt: int,
    cmdsn: int,
    exp_statsn: int,
    data: bytes,
    ttt: int = RESERVED_TAG,
    final: bool = True,
    immediate: bool = False,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        TEXT,
        F_FINAL if final else 0,
        immediate=immediate,
        itt=itt,
        words=(ttt, cmdsn, exp_statsn),
        data=data,
        digests=digests,
    )


def data_out(
    *,
    itt: int,
    ttt: int,
    exp_statsn: int,
    datasn: int,
    offset: int,
    data: bytes | bytearray | memoryview,
    final: bool,
    lun: bytes = bytes(8),
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        DATA_OUT,
        F_FINAL if final else 0,
        lun=lun,
        itt=itt,
        words=(ttt, 0, exp_statsn, 0, datasn, offset),
        data=data,
        digests=digests,
    )


def logout_request(
    *,
    itt: int,
    cmdsn: int,
    exp_statsn: int,
    reason: int = 0,
    cid: int = 0,
    immediate: bool = True,
    digests: Digests = NO_DIGESTS,
) -> bytes:
    return build(
        LOGOUT,
        F_FINAL | reason,
        immediate=immediate,
        itt=itt,
        words=(cid << 16, cmdsn, exp_statsn),
        digests=digests,
    )
