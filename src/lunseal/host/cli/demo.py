"""``lunseal demo``: the whole story with a real daemon in a temporary directory.

create a LUN and write data -> back up through a mirror -> lose data on the
source -> restore from the mirror (token intact) -> a careless host writes to
the split copy -> restore again (token changed: the archive is used) ->
compare contents after each restore.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import typer

from lunseal.errors import LunsealError
from lunseal.host.archive import Repository
from lunseal.host.backup.common import Log, nbd_uri, no_progress
from lunseal.host.backup.create import create_backup
from lunseal.host.backup.restore import plan_restore, run_restore
from lunseal.host.cli.common import console
from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient

MiB = 1 << 20
SIZE = 64 * MiB


def demo(keep: bool = typer.Option(False, "--keep", help="keep the temporary directory")) -> None:
    """Run the host/backup/restore story end to end and print each step."""
    tmp = Path(tempfile.mkdtemp(prefix="lunseal-demo-"))
    step = _stepper()
    proc = _start_daemon(tmp / "array", step)
    try:
        info = json.loads((tmp / "array" / "daemon.json").read_text())
        token = (tmp / "array" / "api-token").read_text().strip()
        with ArrayClient(info["api_url"], token) as api:
            _story(api, Repository.open_local(tmp / "archive"), step)
    finally:
        proc.terminate()
        proc.wait(30)
        if not keep:
            subprocess.run(["rm", "-rf", str(tmp)], check=False)
    step(f"done{f' (files kept in {tmp})' if keep else ''}")


def _stepper() -> Callable[[str], None]:
    start = time.monotonic()

    def step(message: str) -> None:
        console.print(f"[dim]{time.monotonic() - start:5.1f}s[/] {message}", highlight=False)

    return step


def _start_daemon(home: Path, step: Callable[[str], None]) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "lunseal", "--home", str(home), "serve"]
    cmd += ["--nbd-port", "0", "--api-port", "0", "--no-demo", "--clean-after", "0.5"]
    home.mkdir(parents=True)
    log = (home.parent / "daemon.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    deadline = time.monotonic() + 30
    while not (home / "daemon.json").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise LunsealError(f"the demo daemon did not start; see {home.parent / 'daemon.log'}")
        time.sleep(0.05)
    step(f"started an array in {home} (pid {proc.pid})")
    return proc


def _digest(api: ArrayClient, lun: str) -> str:
    h = hashlib.sha256()
    with NbdClient(nbd_uri(api, lun)) as nbd:
        for _, data in nbd.read_ranges((o, 4 * MiB) for o in range(0, nbd.size, 4 * MiB)):
            h.update(data)
    return h.hexdigest()[:16]


def _write(api: ArrayClient, lun: str, offset: int, data: bytes) -> None:
    with NbdClient(nbd_uri(api, lun)) as nbd:
        nbd.write(offset, data)
        nbd.flush()


def _story(api: ArrayClient, repo: Repository, step: Callable[[str], None]) -> None:
    api.create_lun("app", SIZE)
    _write(api, "app", 0, os.urandom(32 * MiB))
    step("created LUN app (64M) and wrote 32M of application data over NBD")
    log = Log(say=lambda m: step(f"  backup: {m}"))
    backup = create_backup(
        api, repo, "app", "app-copy", target_access="rw", log=log, progress=no_progress
    ).manifest
    original = _digest(api, "app")
    step(f"backup {backup.id} taken; content of app: {original}")

    _write(api, "app", 0, bytes(8 * MiB))
    step(f"oops: the first 8M of app were overwritten; content now {_digest(api, 'app')}")
    _restore(api, repo, backup.id, original, step)

    _write(api, "app-copy", 16 * MiB, b"careless host " * 1000)
    step("a careless host wrote 14K into the split disk copy app-copy")
    _write(api, "app", 4 * MiB, bytes(MiB))
    step("and app lost data again")
    _restore(api, repo, backup.id, original, step)


def _restore(
    api: ArrayClient, repo: Repository, backup_id: str, expected: str, step: Callable[[str], None]
) -> None:
    plan = plan_restore(api, repo, backup_id)
    run_restore(
        api, repo, plan, log=Log(say=lambda m: step(f"  restore: {m}")), progress=no_progress
    )
    got = _digest(api, "app")
    verdict = "[green]equals the backup[/]" if got == expected else "[red]DIFFERS[/]"
    step(f"restored ({plan.path} path): content of app {got} {verdict}")
    if got != expected:
        raise LunsealError("the demo restore did not reproduce the backup")
