"""The ACL at work on a real daemon: logins refused and allowed, CHAP one-way and
mutual, LUN masking and read-only access, and sessions ended when their entry
changes; through lunseal's initiator and through libiscsi's tools."""

from __future__ import annotations

import itertools
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from lunseal.frontends.iscsi.access import ChapSecret
from lunseal.host.iscsi.initiator import Initiator, IscsiError, LoginRefused
from lunseal.schema.iscsi import ChapBody, InitiatorAllow
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = pytest.mark.daemon

HOST = "iqn.2026-12.test.acl:host"
SECRET = "acl-secret-0123"
MUTUAL = "acl-mutual-0123"
REPORT_LUNS = bytes([0xA0, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0])
_ids = itertools.count()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("acl") / "home").start()
    try:
        with d.client() as api:
            api.create_lun("one", "1M", number=1)
            api.create_lun("two", "1M", number=2)
        yield d
    finally:
        d.kill()


@pytest.fixture(autouse=True)
def open_again(daemon: Daemon) -> Iterator[None]:
    """Each test starts and ends with no ACL."""
    yield
    with daemon.client() as api:
        for initiator in api.iscsi().initiators:
            api.deny_initiator(initiator.name)


def session(
    daemon: Daemon,
    name: str = HOST,
    chap: ChapSecret | None = None,
    mutual: ChapSecret | None = None,
) -> Initiator:
    ini = Initiator.connect("127.0.0.1", daemon.iscsi_port, name=name)
    try:
        ini.login(daemon.iscsi_target, chap=chap, mutual=mutual)
    except BaseException:
        ini.close()
        raise
    return ini


def luns_seen(ini: Initiator) -> list[int]:
    for _ in range(4):  # the first command of a new session hears a unit attention
        r = ini.command(0, REPORT_LUNS, read_length=4096)
        if r.status == 0:
            break
    assert r.status == 0, r.sense.hex()
    (n,) = struct.unpack_from(">I", r.data)
    return [struct.unpack_from(">H", r.data, 8 + i)[0] & 0x3FFF for i in range(0, n, 8)]


def write(ini: Initiator, lun: int) -> tuple[int, int, int]:
    """WRITE(10) of one block at LBA 0: (status, sense key, ASC), past unit attentions."""
    cdb = bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    for _ in range(4):
        r = ini.command(lun, cdb, data_out=b"\xa5" * 512)
        if r.status != 0x02 or r.sense_key != 0x06:
            break
    return r.status, r.sense_key, r.sense[12] if len(r.sense) > 12 else 0


def allow(daemon: Daemon, name: str = HOST, **body: object) -> None:
    with daemon.client() as api:
        api.allow_initiator(name, InitiatorAllow.model_validate(body))


def test_without_an_acl_anyone_logs_in_and_sees_everything(daemon: Daemon) -> None:
    with session(daemon, f"iqn.2026-12.test.acl:any{next(_ids)}") as ini:
        assert luns_seen(ini) == [0, 1, 2]


def test_once_configured_only_allowed_initiators_log_in(daemon: Daemon) -> None:
    allow(daemon)
    with pytest.raises(LoginRefused) as refused:
        session(daemon, "iqn.2026-12.test.acl:stranger").close()
    assert refused.value.status == 0x0202  # initiator error: forbidden
    with session(daemon, HOST.upper()) as ini:  # names compare case-insensitively
        assert luns_seen(ini) == [0, 1, 2]


def test_masking_and_read_only(daemon: Daemon) -> None:
    allow(daemon, luns={"one": "ro", "two": "rw"})
    with session(daemon) as ini:
        assert luns_seen(ini) == [1, 2]
        assert write(ini, 1) == (0x02, 0x07, 0x27)  # DATA PROTECT, WRITE PROTECTED
        assert write(ini, 2) == (0x00, 0, 0)
        status, key, asc = write(ini, 0)  # masked: as if it did not exist
        assert (status, key, asc) == (0x02, 0x05, 0x25)


def test_chap_one_way_and_mutual(daemon: Daemon) -> None:
    allow(daemon, chap={"user": "h", "secret": SECRET})
    for chap in (None, ChapSecret("h", "wrong-secret-00"), ChapSecret("x", SECRET)):
        with pytest.raises(LoginRefused) as refused:
            session(daemon, chap=chap).close()
        assert refused.value.status == 0x0201  # initiator error: authentication failed
    with session(daemon, chap=ChapSecret("h", SECRET)) as ini:
        assert luns_seen(ini)
    with daemon.client() as api:
        api.set_chap(HOST, ChapBody(user="h", secret=SECRET), ChapBody(user="t", secret=MUTUAL))
    with session(daemon, chap=ChapSecret("h", SECRET), mutual=ChapSecret("t", MUTUAL)) as ini:
        assert luns_seen(ini)
    with pytest.raises(IscsiError):  # the target cannot prove itself with another secret
        session(daemon, chap=ChapSecret("h", SECRET), mutual=ChapSecret("t", "not-the-secret"))


def test_changing_an_entry_ends_its_sessions(daemon: Daemon) -> None:
    allow(daemon)
    allow(daemon, "iqn.2026-12.test.acl:bystander")
    with session(daemon) as ini, session(daemon, "iqn.2026-12.test.acl:bystander") as other:
        assert luns_seen(ini) == [0, 1, 2]
        assert luns_seen(other) == [0, 1, 2]
        allow(daemon)  # the same again: nothing changes, the session carries on
        assert luns_seen(ini) == [0, 1, 2]
        allow(daemon, luns={"two": "ro"})  # it logged in seeing everything read-write
        with pytest.raises(IscsiError):
            luns_seen(ini)
        assert luns_seen(other) == [0, 1, 2]  # other initiators carry on
    with session(daemon) as ini:
        assert luns_seen(ini) == [2]


def test_libiscsi_tools_with_chap(daemon: Daemon, tmp_path: Path) -> None:
    require_tools("iscsi-inq", "iscsi-ls")
    name = "iqn.2026-12.test.acl:libiscsi"
    allow(daemon, name, luns={"two": "rw"}, chap={"user": "lib", "secret": SECRET})
    portal = f"127.0.0.1:{daemon.iscsi_port}"

    def inq(user: str) -> subprocess.CompletedProcess[str]:
        url = f"iscsi://{user}@{portal}/{daemon.iscsi_target}/2"
        return subprocess.run(
            ["iscsi-inq", "-i", name, url], capture_output=True, text=True, timeout=60
        )

    good = inq(f"lib%{SECRET}")
    assert good.returncode == 0, good.stderr
    assert "lunseal" in good.stdout.lower()
    assert inq("lib%wrong-secret-000").returncode != 0


def test_the_first_entry_closes_the_target_to_sessions_already_open(daemon: Daemon) -> None:
    with session(daemon, "iqn.2026-12.test.acl:early") as early:
        assert luns_seen(early) == [0, 1, 2]
        allow(daemon)  # someone else: the target is no longer open
        with pytest.raises(IscsiError):
            luns_seen(early)
