"""In-band state commands over iSCSI land in the audit trail with the initiator's
name and address, next to the API's calls."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.support.cli import lunseal
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

IQN = "iqn.2026-12.io.example:auditor"


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("audit-iscsi") / "home").start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()


def test_in_band_state_commands_are_audited(daemon: Daemon) -> None:
    with daemon.client() as api:
        number = api.create_lun("inband", "8M").number
    url = f"iscsi://127.0.0.1:{daemon.iscsi_port}/{daemon.iscsi_target}/{number}"
    env = {"LUNSEAL_INITIATOR_NAME": IQN}
    since = time.time()
    enabled = lunseal("state", "enable", url, "--hold", "nightly", env=env)
    assert enabled.returncode == 0, enabled.stderr
    token = enabled.stdout.strip()
    checked = lunseal("state", "check", url, token, env=env)
    assert checked.returncode == 0, checked.stderr
    refused = lunseal("state", "disable", url, "--hold", "no-such-hold", env=env)
    assert refused.returncode != 0

    headers = {"Authorization": f"Bearer {daemon.token}"}
    events = httpx.get(
        f"{daemon.api_url}/v1/audit", params={"since": since}, headers=headers, timeout=30
    ).json()
    mine = [e for e in events if e["actor"] == f"iscsi:{IQN}"]
    actions = [(e["action"], e["target"], e["result"]) for e in mine]
    assert ("iSCSI STATE OUT ACQUIRE_HOLD", "lun=inband", "ok") in actions
    assert ("iSCSI STATE OUT CHECK_TOKEN", "lun=inband", "ok") in actions
    releases = [e for e in mine if e["action"] == "iSCSI STATE OUT RELEASE_HOLD"]
    assert releases
    assert releases[-1]["result"] == "refused"
    assert "no-such-hold" in releases[-1]["detail"]
    # Which initiator port (IQN + ISID) and from where.
    assert all(e["detail"].startswith(f"{IQN},i,0x") for e in mine)
    assert all(" from 127.0.0.1:" in e["detail"] for e in mine)
    # The daemon's log has the same events, under the lunseal.audit logger.
    log = daemon.log()
    assert f"actor=iscsi:{IQN} action=iSCSI STATE OUT ACQUIRE_HOLD target=lun=inband" in log
