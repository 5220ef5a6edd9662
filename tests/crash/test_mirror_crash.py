"""Mirrors against ``kill -9``: a real daemon killed in the middle of a copy.

After the restart the copy must resume from what the array recorded (region
maps saved at checkpoints plus the write-intent log) and finish with both
sides identical, as ``qemu-img compare`` sees them over NBD.

Nothing depends on the machine's speed: waits have generous limits that only
a hang reaches, and a kill that a slow machine lets land after the copy ended
is detected (no resume in the log) and the copy is set up again, a bounded
number of times.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from lunseal.schema.mirrors import MirrorInfo
from tests.interop.helpers import MiB, qemu_io, random_file, run
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.crash, pytest.mark.daemon]

KiB = 1 << 10
G = 64 * KiB
#: Large enough that a copy takes many steps, so the kill lands in the middle.
BIG = 512 * MiB
#: Limit for one wait (a copy of BIG, a daemon start): reached only by a hang.
STEP_TIMEOUT = 300.0
#: Copies set up again when a slow machine let one finish before the kill.
ATTEMPTS = 5


class Home:
    """One data directory; a daemon on it can be killed and started again."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.daemon: Daemon | None = None

    def start(self) -> Daemon:
        # --clean-after: no idle checkpoint during a test; only the copy's own
        # checkpoints (every second) and the intent log protect the marks.
        self.daemon = Daemon(self.root, extra_args=["--no-demo", "--clean-after", "3600"])
        return self.daemon.start()

    def kill(self) -> None:
        assert self.daemon is not None
        self.daemon.kill()
        assert self.daemon.proc is not None
        assert self.daemon.proc.returncode == -9


@pytest.fixture
def home(tmp_path: Path) -> Iterator[Home]:
    h = Home(tmp_path / "home")
    yield h
    if h.daemon is not None:
        h.daemon.kill()


def mirror(d: Daemon, name: str = "dst") -> MirrorInfo:
    with d.client() as api:
        return api.mirror(name)


def wait_state(d: Daemon, state: str, timeout: float = STEP_TIMEOUT) -> MirrorInfo:
    deadline = time.monotonic() + timeout
    while (info := mirror(d)).state != state:
        assert time.monotonic() < deadline, f"mirror is {info.state} after {timeout}s, not {state}"
        time.sleep(0.05)
    return info


def kill_mid_copy(
    home: Home, d: Daemon, state: str, total: int, start_copy: Callable[[Daemon], None]
) -> Daemon:
    """Start a copy, SIGKILL once it has made progress, restart; the restarted daemon.

    Whether the kill landed before the copy ended shows in the restarted daemon's
    log ("resuming"); if it did not, the copy is started again (``start_copy``
    dirties the LUN first), up to ATTEMPTS times.
    """
    for _ in range(ATTEMPTS):
        start_copy(d)
        deadline = time.monotonic() + STEP_TIMEOUT
        with d.client() as api:  # one connection: polls come faster than copy steps
            while (info := api.mirror("dst")).state == state and info.bytes_left == total:
                assert time.monotonic() < deadline, "the copy made no progress"
            if info.state != state:
                continue  # ended between two polls: too fast to kill, start again
        home.kill()
        d = home.start()
        if f"mirror dst: resuming {state}" in d.log():
            return d
    pytest.fail(f"in {ATTEMPTS} attempts every copy ended before the kill landed")


def compare(d: Daemon, a: str, b: str) -> None:
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", d.uri(a), d.uri(b))


def fill(d: Daemon, lun: str, image: Path) -> None:
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), d.uri(lun), timeout=120)


@pytest.mark.timeout(ATTEMPTS * 4 * STEP_TIMEOUT)  # only a hang gets near this
def test_kill_during_a_resync_then_it_resumes_and_finishes_identical(
    home: Home, tmp_path: Path
) -> None:
    require_tools("qemu-img")
    d = home.start()
    with d.client() as api:
        api.create_lun("src", BIG)
        api.create_lun("dst", BIG)
        api.create_mirror("src", "dst")
    new = random_file(tmp_path / "new.raw", BIG)

    def split_dirty_resync(d: Daemon) -> None:
        wait_state(d, "synced")
        with d.client() as api:
            api.split_mirror("dst")
        fill(d, "src", new)  # the whole LUN is dirty now
        assert mirror(d).bytes_left == BIG
        with d.client() as api:
            assert api.resync_mirror("dst").state == "resyncing"

    d = kill_mid_copy(home, d, "resyncing", BIG, split_dirty_resync)
    info = mirror(d)
    assert info.state in ("resyncing", "synced")
    info = wait_state(d, "synced")
    assert info.bytes_left == 0
    compare(d, "src", "dst")
    # The restarted mirror fans out again: a new write reaches the target.
    qemu_io(d.uri("src"), "write -P 0x42 100M 64k")
    compare(d, "src", "dst")


@pytest.mark.timeout(ATTEMPTS * 4 * STEP_TIMEOUT)  # only a hang gets near this
def test_kill_during_a_restore_then_it_resumes_and_stays_split(home: Home, tmp_path: Path) -> None:
    require_tools("qemu-img", "qemu-io")
    d = home.start()
    with d.client() as api:
        api.create_lun("src", BIG)
    backup = random_file(tmp_path / "backup.raw", BIG)
    fill(d, "src", backup)
    with d.client() as api:
        api.create_mirror("src", "dst", create_target=True)
    wait_state(d, "synced")
    with d.client() as api:
        api.split_mirror("dst")
    damage = random_file(tmp_path / "damage.raw", BIG)

    def damage_restore(d: Daemon) -> None:
        wait_state(d, "split")
        fill(d, "src", damage)
        with d.client() as api:
            assert api.restore_mirror("dst").state == "restoring"

    d = kill_mid_copy(home, d, "restoring", BIG, damage_restore)
    assert mirror(d).state in ("restoring", "split")
    # The source stays closed to hosts until it is restored.  The write carries the
    # backup's own bytes, so if the restore wins the race and finishes first, the
    # accepted write changes nothing the comparisons below look at.
    head = tmp_path / "head.raw"
    with backup.open("rb") as f:
        head.write_bytes(f.read(4 * KiB))
    attempt = qemu_io(d.uri("src"), f"write -s {head} 0 4k", check=False)
    if attempt.returncode != 0:
        assert "Permission denied" in attempt.stderr, attempt.stderr
    else:
        assert mirror(d).state == "split", "a host wrote the source while it was restored"
    info = wait_state(d, "split")
    accepted = attempt.returncode == 0
    assert (info.reason, info.bytes_left) == ("", G if accepted else 0)  # a split write marks
    compare(d, "src", "dst")
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(backup), d.uri("dst"))
    qemu_io(d.uri("src"), "write -P 1 0 4k")  # open to hosts again


@pytest.mark.timeout(4 * STEP_TIMEOUT)  # only a hang gets near this
def test_kill_while_split_loses_no_mark_of_either_side(home: Home) -> None:
    """Marks made since the last checkpoint live only in the intent log when the kill comes."""
    require_tools("qemu-img", "qemu-io")
    d = home.start()
    with d.client() as api:
        api.create_lun("src", 64 * MiB)
        api.create_mirror("src", "dst", create_target=True)
    wait_state(d, "synced")
    qemu_io(d.uri("src"), "write -P 0x10 0 64M")
    with d.client() as api:
        api.split_mirror("dst", target_access="rw")
    qemu_io(d.uri("src"), "write -P 0x20 3M 100k", "write -P 0x21 40M 4k")
    qemu_io(d.uri("dst"), "write -P 0x30 20M 64k")
    before = mirror(d)
    assert (before.source_dirty_regions, before.target_dirty_regions) == (3, 1)
    home.kill()

    d = home.start()
    after = mirror(d)
    assert (after.state, after.target_access, after.split_at) == ("split", "rw", before.split_at)
    # The intent log marks whole 16 MiB regions: more than was written, never less.
    assert after.source_dirty_regions >= before.source_dirty_regions
    assert after.target_dirty_regions >= before.target_dirty_regions
    assert after.bytes_left <= 3 * 16 * MiB

    resync = d.cli("mirror", "resync", "dst", "--wait")
    assert resync.returncode == 0, resync.stderr
    compare(d, "src", "dst")


@pytest.mark.timeout(4 * STEP_TIMEOUT)  # only a hang gets near this
def test_kill_while_fio_writes_a_synced_mirror(home: Home, tmp_path: Path) -> None:
    """Writes in flight at the kill may have reached one side only: the restart resyncs."""
    require_tools("qemu-img", "fio")
    d = home.start()
    with d.client() as api:
        api.create_lun("src", 64 * MiB)
        api.create_mirror("src", "dst", create_target=True)
    wait_state(d, "synced")
    fio = subprocess.Popen(
        [
            "fio",
            "--name=crash",
            "--ioengine=nbd",
            f"--uri={d.uri('src')}",
            "--rw=randwrite",
            "--bs=64k",
            "--iodepth=16",
            "--size=64M",
            "--time_based",
            "--runtime=600",  # ended by the kill, not by the clock
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + STEP_TIMEOUT
        while True:
            with d.client() as api:
                if api.show_lun("src").stats.bytes_written > 32 * MiB:
                    break
            assert time.monotonic() < deadline, "fio did not write"
            time.sleep(0.02)
        home.kill()
        fio.wait(STEP_TIMEOUT)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()

    d = home.start()
    info = mirror(d)
    assert info.state in ("resyncing", "synced")
    assert "writes may have been in flight at a crash; resyncing" in d.log()
    wait_state(d, "synced")
    compare(d, "src", "dst")
    status = json.loads(d.cli("--json", "mirror", "status", "dst").stdout)
    assert status[0]["state"] == "synced"
