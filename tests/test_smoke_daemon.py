from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.cli import lunseal
from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

ROOT = Path(__file__).resolve().parent.parent


def test_daemon_starts_serves_status_and_stops_cleanly(daemon: Daemon) -> None:
    with daemon.client() as api:
        st = api.status()
        assert [lun.name for lun in api.list_luns()] == ["demo"]
    assert st.nbd.unix == daemon.socket
    assert daemon.stop() == 0
    assert not (daemon.home / "daemon.json").exists()


@pytest.mark.timeout(300)
def test_start_script_passes_its_arguments_to_serve(tmp_path: Path) -> None:
    """README command 1 with arguments: install, then serve on free ports in our home."""
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LUNSEAL_")}
    args = ["--home", str(home), "--nbd-port", "0", "--api-port", "0", "--no-unix-socket"]
    with (tmp_path / "start.log").open("wb") as log:
        proc = subprocess.Popen(
            ["bash", str(ROOT / "scripts" / "start.sh"), *args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp_path,
        )
    try:
        # Bounded by count, each step generous: pip runs first.
        for _ in range(2400):
            if (home / "daemon.json").exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        output = (tmp_path / "start.log").read_text()
        assert (home / "daemon.json").exists(), output
        info = json.loads((home / "daemon.json").read_text())
        assert info["pid"] == proc.pid  # start.sh execs the daemon: its pid stops it
        assert info["nbd_unix"] is None
        assert not (tmp_path / "lunseal-data").exists()
        status = lunseal("status", "--json", "--home", str(home))
        assert status.returncode == 0, status.stderr
        assert json.loads(status.stdout)["luns"] == 1  # the demo LUN
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, (tmp_path / "start.log").read_text()
    assert f"from {home}" in (tmp_path / "start.log").read_text()  # the banner
