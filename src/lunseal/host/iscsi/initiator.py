"""A small synchronous iSCSI initiator on the target's own PDU codec.

Enough for a backup host and for tests: log in (CHAP one-way and mutual,
digests, staged or one-PDU), discover targets, run one SCSI command at a time
with data in or out (immediate, unsolicited and R2T-solicited data), NOP,
task management, logout.  Not a general-purpose initiator: one connection,
one outstanding command, ErrorRecoveryLevel 0.

    with Initiator.connect("127.0.0.1", 3260) as ini:
        ini.login("iqn.2026-12.io.lunseal:lunseal.ID")
        r = ini.command(0, bytes([0x25]) + bytes(9), read_length=8)  # READ CAPACITY(10)
"""

from __future__ import annotations

import hmac
import secrets
import socket
from dataclasses import dataclass, field
from types import TracebackType
from urllib.parse import unquote, urlsplit

from lunseal.errors import InvalidArgument, LunsealError, ProtocolError
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import ChapSecret
from lunseal.frontends.iscsi.login import LoginFailed, chap_response, decode_binary

DEFAULT_PORT = 3260
DEFAULT_INITIATOR = "iqn.2026-12.io.lunseal:initiator"
#: The most data-in one command may return to this initiator.
MAX_READ = 64 << 20


class IscsiError(LunsealError):
    """The target refused or broke the conversation."""

    exit_code = 1
    code = "iscsi_error"


class LoginRefused(IscsiError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class IscsiUrl:
    host: str
    port: int
    target: str
    lun: int
    user: str = ""
    secret: str = ""


def parse_url(url: str) -> IscsiUrl:
    """``iscsi://[user%secret@]HOST[:PORT]/IQN/LUN`` (libiscsi's form)."""
    parts = urlsplit(url)
    if parts.scheme != "iscsi" or not parts.hostname:
        raise InvalidArgument(f"not an iscsi://HOST[:PORT]/IQN/LUN URL: {url!r}")
    path = parts.path.strip("/").split("/")
    if len(path) != 2 or not path[0] or not path[1].isdigit():
        raise InvalidArgument(f"an iSCSI URL needs /IQN/LUN after the portal: {url!r}")
    user, secret = "", ""
    if parts.username:
        # libiscsi's form: the first '%' separates user and secret, taken as they are.
        user, _, secret = parts.username.partition("%")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise InvalidArgument(f"bad port in {url!r}") from None
    return IscsiUrl(parts.hostname, port, unquote(path[0]), int(path[1]), user, secret)


@dataclass
class Response:
    status: int
    data: bytes = b""
    sense: bytes = b""
    residual_flags: int = 0
    residual: int = 0

    @property
    def sense_key(self) -> int:
        return self.sense[2] & 0x0F if len(self.sense) > 2 else 0


@dataclass
class Session:
    """What the login settled."""

    keys: dict[str, str] = field(default_factory=dict)
    tsih: int = 0
    #: What the target receives per PDU.
    target_max_recv: int = 8192
    first_burst: int = 65536
    max_burst: int = 262144
    immediate_data: bool = True
    initial_r2t: bool = True


class Initiator:
    def __init__(
        self, sock: socket.socket, *, name: str = DEFAULT_INITIATOR, isid: bytes | None = None
    ) -> None:
        self.sock = sock
        self.name = name
        # ISID type "random" (0x80 | ...) unless given.
        self.isid = isid or bytes([0x80]) + secrets.token_bytes(5)
        self.decoder = p.PduDecoder(max_data=p.LOGIN_MAX_DATA, expect=p.TARGET_OPCODES)
        self.digests = p.NO_DIGESTS
        self.session = Session()
        self.cmdsn = 1
        self.exp_statsn = 0
        self._itt = 0
        self.max_recv = 262144

    @classmethod
    def connect(
        cls,
        host: str,
        port: int = DEFAULT_PORT,
        *,
        timeout: float = 10.0,
        name: str = DEFAULT_INITIATOR,
        isid: bytes | None = None,
    ) -> Initiator:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except OSError as exc:
            raise IscsiError(
                f"cannot connect to iSCSI portal {host}:{port}: {exc.strerror or exc}"
            ) from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return cls(sock, name=name, isid=isid)

    def __enter__(self) -> Initiator:
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    # -- raw PDUs ---------------------------------------------------------------------

    def next_itt(self) -> int:
        self._itt = (self._itt + 1) % 0xFFFFFFFF
        return self._itt

    def send(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except OSError as exc:
            raise IscsiError(f"iSCSI target connection lost: {exc.strerror or exc}") from None

    def recv_pdu(self) -> p.Pdu:
        """The next PDU from the target (answering its NOP-In pings on the way)."""
        while True:
            pdu = self.decoder.next_pdu()
            if pdu is not None:
                if pdu.opcode == p.NOP_IN and pdu.itt == p.RESERVED_TAG:
                    self._answer_ping(pdu)
                    continue
                self._track(pdu)
                return pdu
            try:
                chunk = self.sock.recv(1 << 20)
            except TimeoutError:
                raise IscsiError("the iSCSI target did not answer in time") from None
            except OSError as exc:
                raise IscsiError(f"iSCSI target connection lost: {exc.strerror or exc}") from None
            if not chunk:
                raise IscsiError("the iSCSI target closed the connection")
            self.decoder.receive_data(chunk)

    def _track(self, pdu: p.Pdu) -> None:
        if pdu.opcode in (p.DATA_IN, p.R2T) and not pdu.flags & p.F_STATUS:
            return  # carries no StatSN of its own
        self.exp_statsn = (pdu.statsn + 1) % (1 << 32)

    def _answer_ping(self, pdu: p.Pdu) -> None:
        if pdu.ttt != p.RESERVED_TAG:
            self.send(
                p.nop_out(
                    itt=p.RESERVED_TAG,
                    ttt=pdu.ttt,
                    cmdsn=self.cmdsn,
                    exp_statsn=self.exp_statsn,
                    digests=self.digests,
                )
            )

    # -- login -------------------------------------------------------------------------

    def login(
        self,
        target: str | None = None,
        *,
        chap: ChapSecret | None = None,
        mutual: ChapSecret | None = None,
        header_digest: bool = False,
        data_digest: bool = False,
        keys: dict[str, str] | None = None,
        one_pdu: bool = False,
    ) -> Session:
        """Log in to ``target`` (``None``: a discovery session).  ``one_pdu``
        sends everything in one operational PDU, as libiscsi does (no CHAP)."""
        declare = {
            "InitiatorName": self.name,
            "SessionType": "Discovery" if target is None else "Normal",
        }
        if target is not None:
            declare["TargetName"] = target
        operational = {
            "HeaderDigest": "CRC32C,None" if header_digest else "None",
            "DataDigest": "CRC32C,None" if data_digest else "None",
            "MaxRecvDataSegmentLength": str(self.max_recv),
        }
        if target is not None:
            operational |= {
                "InitialR2T": "No",
                "ImmediateData": "Yes",
                "MaxBurstLength": "262144",
                "FirstBurstLength": "65536",
                "DefaultTime2Wait": "0",
                "DefaultTime2Retain": "0",
                "MaxOutstandingR2T": "1",
                "ErrorRecoveryLevel": "0",
                "MaxConnections": "1",
                "DataPDUInOrder": "Yes",
                "DataSequenceInOrder": "Yes",
            }
        operational |= keys or {}
        if one_pdu and chap is None:
            answers = self._login_exchange(
                p.OPERATIONAL_STAGE, p.FULL_FEATURE_PHASE, declare | operational
            )
        else:
            self._security(declare, chap, mutual)
            answers = self._login_exchange(p.OPERATIONAL_STAGE, p.FULL_FEATURE_PHASE, operational)
        self._apply(answers)
        return self.session

    def _security(
        self, declare: dict[str, str], chap: ChapSecret | None, mutual: ChapSecret | None
    ) -> None:
        method = "CHAP" if chap is not None else "None"
        if chap is None:
            self._login_exchange(
                p.SECURITY_STAGE, p.OPERATIONAL_STAGE, declare | {"AuthMethod": method}
            )
            return
        answers = self._login_exchange(
            p.SECURITY_STAGE,
            p.OPERATIONAL_STAGE,
            declare | {"AuthMethod": "CHAP,None"},
            transit=False,
        )
        if answers.get("AuthMethod") != "CHAP":
            raise IscsiError(
                f"the target did not agree to CHAP (AuthMethod={answers.get('AuthMethod')})"
            )
        answers = self._login_exchange(
            p.SECURITY_STAGE, p.OPERATIONAL_STAGE, {"CHAP_A": "5"}, transit=False
        )
        try:
            identifier, challenge = int(answers["CHAP_I"]), decode_binary(answers["CHAP_C"])
        except (KeyError, ValueError, LoginFailed) as exc:
            raise IscsiError(f"bad CHAP challenge from the target: {exc}") from None
        reply = {
            "CHAP_N": chap.user,
            "CHAP_R": "0x" + chap_response(identifier, chap.secret, challenge).hex(),
        }
        my_id = my_challenge = None
        if mutual is not None:
            my_id, my_challenge = secrets.randbelow(256), secrets.token_bytes(16)
            reply |= {"CHAP_I": str(my_id), "CHAP_C": "0x" + my_challenge.hex()}
        answers = self._login_exchange(p.SECURITY_STAGE, p.OPERATIONAL_STAGE, reply)
        if mutual is not None:
            assert my_id is not None
            assert my_challenge is not None
            expected = chap_response(my_id, mutual.secret, my_challenge)
            got = answers.get("CHAP_R", "")
            if (
                answers.get("CHAP_N") != mutual.user
                or not got
                or not hmac.compare_digest(decode_binary(got), expected)
            ):
                raise IscsiError("the target failed mutual CHAP: it is not who it claims to be")

    def _login_exchange(
        self, csg: int, nsg: int, keys: dict[str, str], *, transit: bool = True
    ) -> dict[str, str]:
        """One request (repeated empty while the target holds back the transit)."""
        data = text.encode(keys)
        answers: dict[str, str] = {}
        for _ in range(8):
            self.send(
                p.login_request(
                    isid=self.isid,
                    tsih=self.session.tsih,
                    itt=self._itt,
                    cid=0,
                    cmdsn=self.cmdsn,
                    exp_statsn=self.exp_statsn,
                    csg=csg,
                    nsg=nsg,
                    transit=transit,
                    data=data,
                )
            )
            pdu = self.recv_pdu()
            if pdu.opcode != p.LOGIN_RESPONSE:
                raise IscsiError(f"unexpected PDU 0x{pdu.opcode:02x} during login")
            status = (pdu.bhs[36] << 8) | pdu.bhs[37]
            if status:
                raise LoginRefused(f"login refused by the target: {_login_status(status)}", status)
            answers |= dict(text.parse(pdu.data))
            self.session.tsih = pdu.u16(14)
            self.exp_statsn = (pdu.statsn + 1) % (1 << 32)
            if not transit or pdu.flags & p.F_TRANSIT:
                return answers
            data = b""
        raise IscsiError("the target never agreed to end the login stage")

    def _apply(self, answers: dict[str, str]) -> None:
        s = self.session
        s.keys = answers
        s.target_max_recv = int(answers.get("MaxRecvDataSegmentLength", "8192"))
        s.first_burst = int(answers.get("FirstBurstLength", "65536"))
        s.max_burst = int(answers.get("MaxBurstLength", "262144"))
        s.immediate_data = answers.get("ImmediateData", "Yes") == "Yes"
        s.initial_r2t = answers.get("InitialR2T", "Yes") == "Yes"
        self.digests = p.Digests(
            answers.get("HeaderDigest") == "CRC32C", answers.get("DataDigest") == "CRC32C"
        )
        self.decoder.header_digest = self.digests.header
        self.decoder.data_digest = self.digests.data
        self.decoder.max_data = self.max_recv

    # -- full feature phase --------------------------------------------------------------

    def discover(self) -> list[tuple[str, str]]:
        """SendTargets=All: (target name, address) pairs."""
        answers = self.text({"SendTargets": "All"})
        out: list[tuple[str, str]] = []
        for key, value in answers:
            if key == "TargetName":
                out.append((value, ""))
            elif key == "TargetAddress" and out:
                out[-1] = (out[-1][0], value)
        return out

    def text(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        itt = self.next_itt()
        self.send(
            p.text_request(
                itt=itt,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                data=text.encode(keys),
                digests=self.digests,
            )
        )
        self.cmdsn += 1
        pdu = self._expect(p.TEXT_RESPONSE, itt)
        return text.parse(pdu.data)

    def nop(self, data: bytes = b"") -> bytes:
        itt = self.next_itt()
        self.send(
            p.nop_out(
                itt=itt,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                data=data,
                digests=self.digests,
            )
        )
        return self._expect(p.NOP_IN, itt).data

    def task_mgmt(
        self, function: int, lun: int = 0, referenced_itt: int = p.RESERVED_TAG, ref_cmdsn: int = 0
    ) -> int:
        itt = self.next_itt()
        self.send(
            p.task_mgmt(
                function=function,
                itt=itt,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                lun=p.lun_field(lun),
                referenced_itt=referenced_itt,
                ref_cmdsn=ref_cmdsn,
                digests=self.digests,
            )
        )
        return self._expect(p.TASK_MGMT_RESPONSE, itt).bhs[2]

    def logout(self) -> int:
        itt = self.next_itt()
        self.send(
            p.logout_request(
                itt=itt, cmdsn=self.cmdsn, exp_statsn=self.exp_statsn, digests=self.digests
            )
        )
        return self._expect(p.LOGOUT_RESPONSE, itt).bhs[2]

    def _expect(self, opcode: int, itt: int) -> p.Pdu:
        while True:
            pdu = self.recv_pdu()
            if pdu.opcode == p.REJECT:
                raise ProtocolError(f"the target rejected a PDU (reason 0x{pdu.bhs[2]:02x})")
            if pdu.opcode == opcode and pdu.itt == itt:
                return pdu
            if pdu.opcode != p.ASYNC_MESSAGE:
                raise IscsiError(f"unexpected PDU 0x{pdu.opcode:02x} (ITT 0x{pdu.itt:08x})")

    def command(
        self,
        lun: int,
        cdb: bytes,
        *,
        data_out: bytes = b"",
        read_length: int = 0,
        expected_length: int | None = None,
    ) -> Response:
        """Run one SCSI command; ``expected_length`` overrides the EDTL (for residual tests)."""
        if read_length > MAX_READ:
            raise InvalidArgument(f"a read of at most {MAX_READ} bytes")
        itt = self.next_itt()
        edtl = expected_length if expected_length is not None else (len(data_out) or read_length)
        s = self.session
        immediate = b""
        if data_out and s.immediate_data:
            immediate = data_out[: min(s.first_burst, s.target_max_recv, edtl)]
        unsolicited_end = 0 if s.initial_r2t else min(s.first_burst, edtl, len(data_out))
        final = s.initial_r2t or len(immediate) >= unsolicited_end
        self.send(
            p.scsi_command(
                itt=itt,
                lun=p.lun_field(lun),
                cdb=cdb,
                cmdsn=self.cmdsn,
                exp_statsn=self.exp_statsn,
                expected_length=edtl,
                read=read_length > 0,
                write=bool(data_out),
                final=final,
                data=immediate,
                digests=self.digests,
            )
        )
        self.cmdsn += 1
        if not final:
            self._send_data(itt, p.RESERVED_TAG, lun, data_out, len(immediate), unsolicited_end)
        return self._collect(itt, lun, data_out, read_length)

    def _send_data(self, itt: int, ttt: int, lun: int, data: bytes, start: int, end: int) -> None:
        seg = self.session.target_max_recv
        datasn, offset = 0, start
        while offset < end:
            stop = min(end, offset + seg)
            self.send(
                p.data_out(
                    itt=itt,
                    ttt=ttt,
                    exp_statsn=self.exp_statsn,
                    datasn=datasn,
                    offset=offset,
                    data=data[offset:stop],
                    final=stop == end,
                    lun=p.lun_field(lun),
                    digests=self.digests,
                )
            )
            datasn += 1
            offset = stop

    def _collect(self, itt: int, lun: int, data_out: bytes, read_length: int) -> Response:
        buf = bytearray(read_length)
        got = 0
        while True:
            pdu = self.recv_pdu()
            if pdu.opcode == p.REJECT:
                raise ProtocolError(f"the target rejected the command (reason 0x{pdu.bhs[2]:02x})")
            if pdu.itt != itt:
                continue
            if pdu.opcode == p.R2T:
                offset, length = pdu.u32(40), pdu.u32(44)
                self._send_data(
                    itt, pdu.ttt, lun, data_out, offset, min(offset + length, len(data_out))
                )
            elif pdu.opcode == p.DATA_IN:
                offset = pdu.u32(40)
                if offset + len(pdu.data) > read_length:
                    raise ProtocolError("Data-In beyond the expected length")
                buf[offset : offset + len(pdu.data)] = pdu.data
                got = max(got, offset + len(pdu.data))
                if pdu.flags & p.F_STATUS:
                    return Response(
                        pdu.bhs[3], bytes(buf[:got]), b"", pdu.flags & 0x06, pdu.u32(44)
                    )
            elif pdu.opcode == p.SCSI_RESPONSE:
                sense = b""
                if len(pdu.data) >= 2:
                    n = int.from_bytes(pdu.data[:2], "big")
                    sense = pdu.data[2 : 2 + n]
                return Response(pdu.bhs[3], bytes(buf[:got]), sense, pdu.flags & 0x06, pdu.u32(44))
            else:
                raise IscsiError(f"unexpected PDU 0x{pdu.opcode:02x} for a command")


_STATUS = {
    0x0201: "authentication failed",
    0x0202: "initiator not allowed",
    0x0203: "target not found",
    0x0205: "unsupported version",
    0x0207: "missing parameter",
    0x0208: "cannot include in session",
    0x0209: "session type not supported",
    0x020B: "invalid request during login",
}


def _login_status(status: int) -> str:
    return _STATUS.get(status, f"status 0x{status:04x}")
