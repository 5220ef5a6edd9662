"""The target's login machine, sans I/O: stages, CHAP one-way and mutual,
discovery, and the status classes a refused login gets."""

from __future__ import annotations

import base64

import pytest

from lunseal.errors import CatalogError
from lunseal.frontends.iscsi import login as lg
from lunseal.frontends.iscsi import pdu as p
from lunseal.frontends.iscsi import text
from lunseal.frontends.iscsi.access import AccessPolicy, ChapSecret, InitiatorAccess, OpenAccess
from lunseal.frontends.scsi.interface import LunAccess

TARGET = "iqn.2026-12.io.lunseal:lunseal.test"
HOST = "iqn.2026-12.test:host"
CHAP = ChapSecret("host-user", "host-secret-12345")
MUTUAL = ChapSecret("target-user", "target-secret-678")


class Acl:
    """A policy with fixed entries (the catalog-backed one is tested elsewhere)."""

    def __init__(self, entries: dict[str, InitiatorAccess]) -> None:
        self.entries = entries

    def login(self, initiator_name: str) -> InitiatorAccess | None:
        return self.entries.get(initiator_name)


def request(
    keys: dict[str, str],
    csg: int,
    nsg: int,
    *,
    transit: bool = True,
    cont: bool = False,
    tsih: int = 0,
    version_min: int = 0,
) -> p.Pdu:
    wire = bytearray(
        p.login_request(
            isid=b"\x80\x00\x00\x00\x00\x01",
            tsih=tsih,
            itt=1,
            cid=0,
            cmdsn=1,
            exp_statsn=0,
            csg=csg,
            nsg=nsg,
            transit=transit,
            data=text.encode(keys),
            cont=cont,
        )
    )
    wire[3] = version_min
    dec = p.PduDecoder()
    dec.receive_data(wire)
    pdu = dec.next_pdu()
    assert pdu is not None
    return pdu


def answers(reply: lg.LoginReply) -> dict[str, str]:
    return dict(text.parse(reply.data))


def new(policy: AccessPolicy | None = None) -> lg.Login:
    return lg.Login(target_name=TARGET, policy=policy or OpenAccess(), portal="127.0.0.1:3260")


NAMES = {"InitiatorName": HOST, "TargetName": TARGET, "SessionType": "Normal"}
OPERATIONAL = {
    "HeaderDigest": "CRC32C,None",
    "MaxRecvDataSegmentLength": "65536",
    "InitialR2T": "No",
}


def test_one_pdu_login_as_libiscsi_does() -> None:
    login = new()
    reply = login.receive(request(NAMES | OPERATIONAL, 1, 3))
    assert not reply.failed
    assert reply.done
    assert reply.flags & p.F_TRANSIT
    assert reply.flags & 3 == 3
    got = answers(reply)
    assert got["TargetPortalGroupTag"] == "1"
    assert got["HeaderDigest"] == "CRC32C"
    assert got["MaxRecvDataSegmentLength"] == str(text.TARGET_MAX_RECV_DATA)
    assert login.params.header_digest
    assert login.params.initiator_max_recv_data == 65536
    assert login.initiator_name == HOST


def test_staged_login_without_auth() -> None:
    login = new()
    first = login.receive(request(NAMES | {"AuthMethod": "None"}, 0, 1))
    assert not first.failed
    assert not first.done
    assert answers(first)["AuthMethod"] == "None"
    assert first.flags & p.F_TRANSIT
    second = login.receive(request(OPERATIONAL, 1, 3))
    assert second.done
    assert "TargetPortalGroupTag" not in answers(second)  # only in the first response
    assert "MaxRecvDataSegmentLength" in answers(second)


def test_continued_text_is_acknowledged_then_answered() -> None:
    login = new()
    data = text.encode(NAMES | OPERATIONAL)
    part = login.receive(_partial(data[:20]))
    assert not part.failed
    assert part.data == b""
    assert not part.flags & p.F_TRANSIT
    done = login.receive(_final(data[20:]))
    assert done.done
    assert answers(done)["HeaderDigest"] == "CRC32C"


def _partial(data: bytes) -> p.Pdu:
    return _raw(data, cont=True)


def _final(data: bytes) -> p.Pdu:
    return _raw(data, cont=False)


def _raw(data: bytes, *, cont: bool) -> p.Pdu:
    wire = p.login_request(
        isid=b"\x80" + bytes(5),
        tsih=0,
        itt=1,
        cid=0,
        cmdsn=1,
        exp_statsn=0,
        csg=1,
        nsg=3,
        transit=not cont,
        cont=cont,
        data=data,
    )
    dec = p.PduDecoder()
    dec.receive_data(wire)
    pdu = dec.next_pdu()
    assert pdu is not None
    return pdu


def chap_login(
    login: lg.Login, secret: ChapSecret, mutual: ChapSecret | None = None
) -> tuple[lg.LoginReply, int, bytes]:
    first = login.receive(request(NAMES | {"AuthMethod": "CHAP,None"}, 0, 1, transit=False))
    assert answers(first)["AuthMethod"] == "CHAP"
    challenge = login.receive(request({"CHAP_A": "7,5"}, 0, 1, transit=False))
    got = answers(challenge)
    assert got["CHAP_A"] == "5"
    ident, chal = int(got["CHAP_I"]), lg.decode_binary(got["CHAP_C"])
    response = {
        "CHAP_N": secret.user,
        "CHAP_R": "0x" + lg.chap_response(ident, secret.secret, chal).hex(),
    }
    my_id, my_chal = 7, b"initiator-challenge!"
    if mutual is not None:
        response |= {"CHAP_I": str(my_id), "CHAP_C": "0b" + base64.b64encode(my_chal).decode()}
    return login.receive(request(response, 0, 1)), my_id, my_chal


def test_chap_one_way_success() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    reply, _, _ = chap_login(login, CHAP)
    assert not reply.failed
    assert reply.flags & p.F_TRANSIT
    assert login.receive(request(OPERATIONAL, 1, 3)).done


def test_chap_wrong_secret_is_authentication_failure() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    reply, _, _ = chap_login(login, ChapSecret(CHAP.user, "not-the-secret!!"))
    assert reply.status == lg.AUTH_FAILED
    assert reply.status >> 8 == 0x02


def test_chap_wrong_user_is_authentication_failure() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    reply, _, _ = chap_login(login, ChapSecret("someone-else", CHAP.secret))
    assert reply.status == lg.AUTH_FAILED


def test_mutual_chap_target_proves_itself() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP, mutual=MUTUAL)}))
    reply, my_id, my_chal = chap_login(login, CHAP, MUTUAL)
    assert not reply.failed
    got = answers(reply)
    assert got["CHAP_N"] == MUTUAL.user
    assert lg.decode_binary(got["CHAP_R"]) == lg.chap_response(my_id, MUTUAL.secret, my_chal)


def test_mutual_chap_without_a_target_secret_fails() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    reply, _, _ = chap_login(login, CHAP, MUTUAL)
    assert reply.status == lg.AUTH_FAILED


def test_reflected_challenge_is_refused() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP, mutual=MUTUAL)}))
    login.receive(request(NAMES | {"AuthMethod": "CHAP"}, 0, 1, transit=False))
    got = answers(login.receive(request({"CHAP_A": "5"}, 0, 1, transit=False)))
    ident, chal = int(got["CHAP_I"]), lg.decode_binary(got["CHAP_C"])
    reply = login.receive(
        request(
            {
                "CHAP_N": CHAP.user,
                "CHAP_R": "0x" + lg.chap_response(ident, CHAP.secret, chal).hex(),
                "CHAP_I": str(ident),
                "CHAP_C": got["CHAP_C"],
            },
            0,
            1,
        )
    )
    assert reply.status == lg.AUTH_FAILED
    assert "reflected" in reply.why


def test_chap_required_but_skipped() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    assert login.receive(request(NAMES | OPERATIONAL, 1, 3)).status == lg.AUTH_FAILED
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    assert login.receive(request(NAMES | {"AuthMethod": "None"}, 0, 1)).status == lg.AUTH_FAILED


def test_chap_md5_only() -> None:
    login = new(Acl({HOST: InitiatorAccess(chap=CHAP)}))
    login.receive(request(NAMES | {"AuthMethod": "CHAP"}, 0, 1, transit=False))
    assert login.receive(request({"CHAP_A": "6,7"}, 0, 1, transit=False)).status == lg.AUTH_FAILED


def test_unknown_initiator_is_forbidden() -> None:
    login = new(Acl({}))
    assert login.receive(request(NAMES | OPERATIONAL, 1, 3)).status == lg.FORBIDDEN


def test_wrong_target_is_not_found() -> None:
    reply = new().receive(request(NAMES | {"TargetName": "iqn.2026-12.other:t"}, 1, 3))
    assert reply.status == lg.NOT_FOUND


@pytest.mark.parametrize("missing", ["InitiatorName", "TargetName"])
def test_missing_names_are_missing_parameter(missing: str) -> None:
    keys = {k: v for k, v in NAMES.items() if k != missing}
    assert new().receive(request(keys, 1, 3)).status == lg.MISSING_PARAMETER


def test_unsupported_version_and_session_type() -> None:
    assert new().receive(request(NAMES, 1, 3, version_min=1)).status == lg.UNSUPPORTED_VERSION
    bad = NAMES | {"SessionType": "Sideways"}
    assert new().receive(request(bad, 1, 3)).status == lg.SESSION_TYPE_UNSUPPORTED


def test_adding_a_connection_to_a_session_is_refused() -> None:
    assert new().receive(request(NAMES, 1, 3, tsih=5)).status == lg.CANNOT_INCLUDE


def test_bad_stage_transitions() -> None:
    assert new().receive(request(NAMES, 1, 0)).status == lg.INITIATOR_ERROR  # backwards
    login = new()
    login.receive(request(NAMES | {"AuthMethod": "None"}, 0, 0, transit=False))
    assert login.receive(request({}, 1, 3)).status == lg.INVALID_DURING_LOGIN  # skipped a stage


def test_discovery_needs_no_target_name() -> None:
    login = new()
    reply = login.receive(request({"InitiatorName": HOST, "SessionType": "Discovery"}, 1, 3))
    assert reply.done
    assert login.session_type == lg.DISCOVERY
    assert "TargetPortalGroupTag" not in answers(reply)


def test_lun_access_comes_from_the_policy() -> None:
    access = InitiatorAccess(luns=LunAccess(visible=frozenset({2})))
    login = new(Acl({HOST: access}))
    assert login.receive(request(NAMES | OPERATIONAL, 1, 3)).done
    assert login.access == access


def test_malformed_login_text_is_an_initiator_error() -> None:
    reply = new().receive(_final(b"NoEqualsSign\0"))
    assert reply.status == lg.INITIATOR_ERROR


class BrokenCatalog:
    def login(self, initiator_name: str) -> InitiatorAccess | None:
        raise CatalogError("catalog: disk I/O error")


def test_an_unreadable_acl_is_service_unavailable() -> None:
    reply = new(BrokenCatalog()).receive(request(NAMES | OPERATIONAL, 1, 3))
    assert reply.status == lg.SERVICE_UNAVAILABLE
    assert reply.status >> 8 == 0x03  # a target error: the initiator may retry
