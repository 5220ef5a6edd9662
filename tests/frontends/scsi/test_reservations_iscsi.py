"""Reservations end to end: a real daemon, real iSCSI initiators, real restarts and
SIGKILL, and libiscsi's conformance tests for reservations."""

from __future__ import annotations

import re
import struct
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from lunseal.frontends.scsi import reservations as pr
from lunseal.frontends.scsi.interface import CHECK_CONDITION, GOOD, RESERVATION_CONFLICT
from lunseal.host.iscsi.initiator import Initiator, Response
from tests.frontends.scsi.test_reservations import params, prin_cdb, prout_cdb
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = pytest.mark.daemon

HOST_A = "iqn.2026-12.test:host-a"
HOST_B = "iqn.2026-12.test:host-b"
READ10 = bytes((0x28, 0, 0, 0, 0, 1, 0, 0, 1, 0))
TUR = bytes(6)
EA = 3


@contextmanager
def session(daemon: Daemon, name: str) -> Iterator[Initiator]:
    with Initiator.connect("127.0.0.1", daemon.iscsi_port, name=name) as ini:
        ini.login(daemon.iscsi_target)
        # The first command of a new nexus reports power on / reset.
        first = ini.command(0, TUR)
        assert first.status == CHECK_CONDITION
        assert first.sense[12] == 0x29, first.sense.hex()
        yield ini
        ini.logout()


def out(ini: Initiator, action: int, key: int = 0, sark: int = 0, **kw: object) -> Response:
    type_ = int(kw.pop("type_", 0))  # type: ignore[call-overload]
    aptpl = bool(kw.pop("aptpl", False))
    return ini.command(0, prout_cdb(action, type_), data_out=params(key, sark, aptpl=aptpl))


def keys(ini: Initiator) -> list[int]:
    response = ini.command(0, prin_cdb(pr.READ_KEYS), read_length=8192)
    assert response.status == GOOD, response.sense.hex()
    length = struct.unpack(">I", response.data[4:8])[0]
    return [k for (k,) in struct.iter_unpack(">Q", response.data[8 : 8 + length])]


def test_reservations_over_iscsi_conflict_and_raise_unit_attentions(daemon: Daemon) -> None:
    with session(daemon, HOST_A) as a, session(daemon, HOST_B) as b:
        assert out(a, pr.REGISTER, 0, 0xA).status == GOOD
        assert out(b, pr.REGISTER, 0, 0xB).status == GOOD
        assert out(a, pr.RESERVE, 0xA, type_=EA).status == GOOD
        assert b.command(0, READ10, read_length=512).status == RESERVATION_CONFLICT
        assert a.command(0, READ10, read_length=512).status == GOOD
        # A wrong key: RESERVATION CONFLICT, no sense data.
        wrong = out(b, pr.RESERVE, 0xA, type_=EA)
        assert (wrong.status, wrong.sense) == (RESERVATION_CONFLICT, b"")
        # A short parameter list: CHECK CONDITION, PARAMETER LIST LENGTH ERROR.
        bad = b.command(0, prout_cdb(pr.REGISTER, length=20), data_out=params()[:20])
        assert bad.status == CHECK_CONDITION
        assert (bad.sense_key, bad.sense[12:14]) == (0x5, b"\x1a\x00")
        # CLEAR tells B its registration went: RESERVATIONS PREEMPTED.
        assert out(a, pr.CLEAR, 0xA).status == GOOD
        attention = b.command(0, TUR)
        assert attention.status == CHECK_CONDITION
        assert (attention.sense_key, attention.sense[12:14]) == (0x6, b"\x2a\x03")
        assert b.command(0, READ10, read_length=512).status == GOOD
        assert keys(a) == []


@pytest.mark.crash
def test_registrations_survive_restarts_and_aptpl_decides_after_sigkill(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home").start()
    try:
        with session(daemon, HOST_A) as a:
            assert out(a, pr.REGISTER, 0, 0xA).status == GOOD
            assert out(a, pr.RESERVE, 0xA, type_=EA).status == GOOD
        assert daemon.stop() == 0
        daemon.start()
        with session(daemon, HOST_B) as b:
            assert keys(b) == [0xA]
            assert b.command(0, READ10, read_length=512).status == RESERVATION_CONFLICT
        daemon.kill()  # SIGKILL: A never asked for APTPL, so it is gone
        daemon.start()
        with session(daemon, HOST_A) as a:
            assert keys(a) == []
            assert out(a, pr.REGISTER, 0, 0xA, aptpl=True).status == GOOD
            assert out(a, pr.RESERVE, 0xA, type_=EA).status == GOOD
        daemon.kill()  # with APTPL it stays
        daemon.start()
        with session(daemon, HOST_B) as b:
            assert keys(b) == [0xA]
            assert b.command(0, READ10, read_length=512).status == RESERVATION_CONFLICT
    finally:
        daemon.kill()


#: Every reservation test of iscsi-test-cu (``--list | grep -i -E 'prin|prout|reserv'``)
#: except SANITIZE's, which the target does not offer.
FAMILIES = (
    "SCSI.PrinReadKeys",
    "SCSI.PrinServiceactionRange",
    "SCSI.PrinReportCapabilities",
    "SCSI.ProutRegister",
    "SCSI.ProutReserve",
    "SCSI.ProutClear",
    "SCSI.ProutPreempt",
    "SCSI.Reserve6",
)
#: A cold reset is not a task management function the target offers.
MAY_SKIP = {"TargetColdReset"}


@pytest.mark.interop
def test_libiscsi_reservation_tests_pass(daemon: Daemon) -> None:
    require_tools("iscsi-test-cu")
    url = f"iscsi://{daemon.iscsi_portal}/{daemon.iscsi_target}/0"
    run = subprocess.run(
        ["iscsi-test-cu", "--dataloss", "-t", ",".join(FAMILIES), url],
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    summary = re.search(r"tests\s+(\d+)\s+(\d+)\s+(\d+)\s+(\d+)", output)
    assert summary is not None, output
    total, ran, passed, failed = map(int, summary.groups())
    print(f"iscsi-test-cu reservations: {ran} ran, {passed} passed, {failed} failed")
    assert (failed, passed, ran) == (0, total, total), output
    assert total >= 27, output
    skipped = set(re.findall(r"Test: (\w+) \.\.\.\s+\[SKIPPED\]", output))
    assert skipped <= MAY_SKIP, output
