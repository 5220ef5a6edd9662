"""The target's side of an iSCSI login (RFC 7143 sections 6.3, 12): stages,
security negotiation with CHAP (RFC 1994, MD5; one-way and mutual) and
operational negotiation, sans-I/O.

:meth:`Login.receive` takes one Login Request PDU and returns the reply to
send: its flags, status and text.  A reply with a non-zero status class ends
the login (the caller sends it and closes the connection); one with
``done`` set moves the connection to the full feature phase.

Both ways initiators log in work: staged (security, then operational, then
full feature, each stage in one or more PDUs) and libiscsi's single
operational PDU (CSG=1, T=1, NSG=3) when no CHAP is required.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from lunseal.errors import LunsealError
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import AccessPolicy, InitiatorAccess

# Login status (class << 8 | detail), RFC 7143 11.13.5.
SUCCESS = 0x0000
INITIATOR_ERROR = 0x0200
AUTH_FAILED = 0x0201
FORBIDDEN = 0x0202
NOT_FOUND = 0x0203
UNSUPPORTED_VERSION = 0x0205
MISSING_PARAMETER = 0x0207
CANNOT_INCLUDE = 0x0208
SESSION_TYPE_UNSUPPORTED = 0x0209
INVALID_DURING_LOGIN = 0x020B
TARGET_ERROR = 0x0300
SERVICE_UNAVAILABLE = 0x0301

NORMAL = "Normal"
DISCOVERY = "Discovery"
CHAP_MD5 = "5"
CHAP_CHALLENGE_SIZE = 16
#: The longest CHAP challenge or response we decode (bounded work per login).
MAX_CHAP_BINARY = 1024
#: Text bytes a login may spread over continued PDUs before it is refused.
MAX_LOGIN_TEXT = 64 << 10
#: The one portal group this target has.
PORTAL_GROUP_TAG = 1


class LoginFailed(Exception):
    """Ends a login with a status (internal to this module)."""

    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status
        self.why = why


@dataclass
class LoginReply:
    flags: int
    status: int = SUCCESS
    data: bytes = b""
    #: The connection enters the full feature phase after this reply.
    done: bool = False
    #: Why the login failed, for the log (the initiator sees only ``status``).
    why: str = ""

    @property
    def failed(self) -> bool:
        return self.status != SUCCESS


@dataclass
class _Chap:
    identifier: int = 0
    challenge: bytes = b""
    passed: bool = False


@dataclass
class Login:
    """One connection's login.  ``params`` and the identity fields are valid
    once a reply came back with ``done``."""

    target_name: str
    policy: AccessPolicy
    #: ``host:port`` as SendTargets reports it.
    portal: str = ""
    params: text.Parameters = field(default_factory=text.Parameters)
    initiator_name: str = ""
    session_type: str = NORMAL
    isid: bytes = bytes(6)
    access: InitiatorAccess | None = None
    stage: int = -1  # no PDU yet
    _auth: str = ""  # the AuthMethod chosen: "", "None" or "CHAP"
    _chap: _Chap = field(default_factory=_Chap)
    _declared: bool = False
    _partial: bytearray = field(default_factory=bytearray)
    _first: bool = True
    _tpgt_sent: bool = False

    def receive(self, pdu: p.Pdu) -> LoginReply:
        try:
            return self._receive(pdu)
        except LoginFailed as exc:
            return LoginReply(flags=pdu.flags & 0x0C, status=exc.status, why=exc.why)
        except text.TextError as exc:
            return LoginReply(flags=pdu.flags & 0x0C, status=INITIATOR_ERROR, why=exc.message)
        except LunsealError as exc:
            # The ACL could not be read (a catalog error): try again later.
            return LoginReply(flags=pdu.flags & 0x0C, status=SERVICE_UNAVAILABLE, why=exc.message)

    def _receive(self, pdu: p.Pdu) -> LoginReply:
        transit = bool(pdu.flags & p.F_TRANSIT)
        cont = bool(pdu.flags & p.F_CONTINUE)
        csg = (pdu.flags >> 2) & 3
        nsg = pdu.flags & 3
        self._check_header(pdu, csg, transit, cont)
        self._partial += pdu.data
        if len(self._partial) > MAX_LOGIN_TEXT:
            raise LoginFailed(INITIATOR_ERROR, "login text too long")
        if cont:
            # More of this request's text follows: acknowledge with an empty reply.
            return LoginReply(flags=csg << 2)
        offers = text.parse(bytes(self._partial))
        self._partial.clear()
        if self._first:
            self._identify(pdu, offers)
            self._first = False
        answers: list[tuple[str, str]] = []
        if self.stage == p.SECURITY_STAGE:
            ready = self._security(offers, answers)
        else:
            if self._needs_auth() and self._auth != "CHAP":
                raise LoginFailed(AUTH_FAILED, "CHAP is required but the initiator skipped it")
            answers += text.negotiate(offers, self.params)
            ready = True
        if self.stage == p.OPERATIONAL_STAGE and not self._declared:
            answers.append(("MaxRecvDataSegmentLength", str(self.params.target_max_recv_data)))
            self._declared = True
        return self._reply(csg, nsg, transit and ready, answers)

    def _check_header(self, pdu: p.Pdu, csg: int, transit: bool, cont: bool) -> None:
        if self.stage < 0:
            if pdu.bhs[3] > 0:  # VersionMin: we speak version 0 only
                raise LoginFailed(UNSUPPORTED_VERSION, f"unsupported version {pdu.bhs[3]}")
            if csg not in (p.SECURITY_STAGE, p.OPERATIONAL_STAGE):
                raise LoginFailed(INVALID_DURING_LOGIN, f"login starts in stage {csg}")
            self.stage = csg
        elif csg != self.stage:
            raise LoginFailed(INVALID_DURING_LOGIN, f"stage {csg} sent during stage {self.stage}")
        if transit and cont:
            raise LoginFailed(INITIATOR_ERROR, "login PDU with both T and C set")
        if transit:
            nsg = pdu.flags & 3
            if nsg <= csg or nsg == 2:
                raise LoginFailed(INITIATOR_ERROR, f"transit from stage {csg} to {nsg}")

    def _identify(self, pdu: p.Pdu, offers: list[tuple[str, str]]) -> None:
        keys = dict(offers)
        self.isid = pdu.bhs[8:14]
        if int.from_bytes(pdu.bhs[14:16], "big") != 0:
            # MaxConnections is 1: no connection joins an existing session.
            raise LoginFailed(CANNOT_INCLUDE, "adding a connection to a session is not supported")
        name = keys.get("InitiatorName")
        if not name:
            raise LoginFailed(MISSING_PARAMETER, "no InitiatorName")
        self.initiator_name = name
        self.session_type = keys.get("SessionType", NORMAL)
        if self.session_type not in (NORMAL, DISCOVERY):
            raise LoginFailed(SESSION_TYPE_UNSUPPORTED, f"session type {self.session_type!r}")
        if self.session_type == NORMAL:
            target = keys.get("TargetName")
            if not target:
                raise LoginFailed(MISSING_PARAMETER, "no TargetName for a normal session")
            if target.lower() != self.target_name.lower():
                raise LoginFailed(NOT_FOUND, f"no target {target!r}")
        self.access = self.policy.login(name)
        if self.access is None:
            raise LoginFailed(FORBIDDEN, f"initiator {name!r} may not log in")

    def _needs_auth(self) -> bool:
        return self.access is not None and self.access.chap is not None

    # -- security stage ------------------------------------------------------------

    def _security(self, offers: list[tuple[str, str]], answers: list[tuple[str, str]]) -> bool:
        """Answer one security-stage request; True once the stage may end."""
        keys = dict(offers)
        if "AuthMethod" in keys:
            self._auth = self._choose_auth(keys["AuthMethod"])
            answers.append(("AuthMethod", self._auth))
        for key, value in offers:
            if key not in text.DECLARATIVE and key != "AuthMethod" and not key.startswith("CHAP_"):
                # Operational keys may come early; answer them as the next stage would.
                answers += text.negotiate([(key, value)], self.params)
        if self._auth == "CHAP":
            return self._chap_step(keys, answers)
        if self._needs_auth():
            raise LoginFailed(AUTH_FAILED, "CHAP is required but was not negotiated")
        return True

    def _choose_auth(self, offered: str) -> str:
        methods = offered.split(",")
        if self._needs_auth():
            if "CHAP" in methods:
                return "CHAP"
            raise LoginFailed(AUTH_FAILED, "CHAP is required but the initiator does not offer it")
        if "None" in methods:
            return "None"
        raise LoginFailed(AUTH_FAILED, f"no CHAP secret for this initiator (offered {offered})")

    def _chap_step(self, keys: dict[str, str], answers: list[tuple[str, str]]) -> bool:
        chap = self._chap
        if chap.passed:
            return True
        if not chap.challenge:
            if "CHAP_A" not in keys:
                return False  # the initiator asks for the algorithm in its next request
            if CHAP_MD5 not in keys["CHAP_A"].split(","):
                raise LoginFailed(AUTH_FAILED, f"unsupported CHAP_A {keys['CHAP_A']!r}")
            chap.identifier = secrets.randbelow(256)
            chap.challenge = secrets.token_bytes(CHAP_CHALLENGE_SIZE)
            answers += [
                ("CHAP_A", CHAP_MD5),
                ("CHAP_I", str(chap.identifier)),
                ("CHAP_C", "0x" + chap.challenge.hex()),
            ]
            return False
        self._check_chap_response(keys)
        chap.passed = True
        if "CHAP_I" in keys or "CHAP_C" in keys:
            answers += self._mutual_answer(keys)
        return True

    def _check_chap_response(self, keys: dict[str, str]) -> None:
        assert self.access is not None
        assert self.access.chap is not None
        secret = self.access.chap
        name, response = keys.get("CHAP_N"), keys.get("CHAP_R")
        if name is None or response is None:
            raise LoginFailed(AUTH_FAILED, "CHAP_N or CHAP_R missing")
        expected = chap_response(self._chap.identifier, secret.secret, self._chap.challenge)
        got = decode_binary(response)
        if not hmac.compare_digest(name, secret.user) or not hmac.compare_digest(got, expected):
            raise LoginFailed(AUTH_FAILED, f"CHAP failed for initiator {self.initiator_name!r}")

    def _mutual_answer(self, keys: dict[str, str]) -> list[tuple[str, str]]:
        assert self.access is not None
        mutual = self.access.mutual
        if mutual is None:
            raise LoginFailed(AUTH_FAILED, "mutual CHAP asked for but no target secret is set")
        try:
            identifier = int(keys.get("CHAP_I", ""), 0)
        except ValueError:
            raise LoginFailed(AUTH_FAILED, "bad CHAP_I") from None
        challenge = decode_binary(keys.get("CHAP_C", ""))
        if not 0 <= identifier <= 255 or not challenge:
            raise LoginFailed(AUTH_FAILED, "bad mutual CHAP challenge")
        if challenge == self._chap.challenge:
            # Answering our own challenge would let a peer replay our response.
            raise LoginFailed(AUTH_FAILED, "the initiator reflected the target's challenge")
        response = chap_response(identifier, mutual.secret, challenge)
        return [("CHAP_N", mutual.user), ("CHAP_R", "0x" + response.hex())]

    # -- replies --------------------------------------------------------------------

    def _reply(
        self, csg: int, nsg: int, transit: bool, answers: list[tuple[str, str]]
    ) -> LoginReply:
        if self.session_type == NORMAL and not self._tpgt_sent:
            # RFC 7143 13.9: the first Login Response of a normal session names the group.
            answers.insert(0, ("TargetPortalGroupTag", str(PORTAL_GROUP_TAG)))
            self._tpgt_sent = True
        flags = csg << 2
        done = False
        if transit:
            flags |= p.F_TRANSIT | nsg
            self.stage = nsg
            done = nsg == p.FULL_FEATURE_PHASE
        return LoginReply(flags=flags, data=text.encode(answers), done=done)


def chap_response(identifier: int, secret: str, challenge: bytes) -> bytes:
    """RFC 1994: MD5 over the identifier byte, the secret and the challenge."""
    return hashlib.md5(
        bytes([identifier]) + secret.encode() + challenge, usedforsecurity=False
    ).digest()


def decode_binary(value: str) -> bytes:
    """A CHAP binary value: ``0x`` hex or ``0b`` base64 (RFC 7143 6.1)."""
    if len(value) > 2 * MAX_CHAP_BINARY + 2:
        raise LoginFailed(AUTH_FAILED, "CHAP value too long")
    try:
        if value[:2].lower() == "0x":
            digits = value[2:]
            return bytes.fromhex(digits if len(digits) % 2 == 0 else "0" + digits)
        if value[:2].lower() == "0b":
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise LoginFailed(AUTH_FAILED, "CHAP value is not 0x-hex or 0b-base64")
