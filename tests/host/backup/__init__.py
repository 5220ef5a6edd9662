"""Backup and restore against a real daemon: shared helpers.

The data is written, saved and compared with qemu-img and qemu-io, tools
independent of lunseal's own NBD client; the flows run as real
``lunseal`` processes with the archive named by $LUNSEAL_ARCHIVE.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from lunseal.host.archive import DEFAULT_CHUNK_SIZE
from tests.interop.helpers import qemu_io, random_file, run
from tests.support.daemon import LUNSEAL, Daemon

MiB = 1 << 20
CHUNK = DEFAULT_CHUNK_SIZE

#: A backup or restore of a few hundred MiB takes seconds; a hang is a failure.
CLI_TIMEOUT = 90.0


def lunseal(
    daemon: Daemon, archive: Path, *args: str, ok: bool | None = True, timeout: float = CLI_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``lunseal ARGS`` for ``daemon`` and ``archive``.

    ``ok=True`` requires exit 0, ``ok=False`` a non-zero exit, ``None`` either.
    """
    env = {**os.environ, "LUNSEAL_HOME": str(daemon.home), "LUNSEAL_ARCHIVE": str(archive)}
    proc = subprocess.run(
        [LUNSEAL, *args], capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if ok is not None and (proc.returncode == 0) != ok:
        raise AssertionError(
            f"lunseal {' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def lunseal_json(daemon: Daemon, archive: Path, *args: str) -> Any:
    """``lunseal ARGS --json`` (after the subcommand: --json works anywhere), parsed."""
    return json.loads(lunseal(daemon, archive, *args, "--json").stdout)


def backup(daemon: Daemon, archive: Path, source: str, mirror: str, *extra: str) -> Any:
    """``lunseal backup create`` with --json: the manifest record plus its steps."""
    return lunseal_json(daemon, archive, "backup", "create", source, "--mirror", mirror, *extra)


def restore(daemon: Daemon, archive: Path, backup_id: str, *extra: str) -> Any:
    return lunseal_json(daemon, archive, "restore", backup_id, *extra)


def create_lun(daemon: Daemon, name: str, size: int) -> None:
    with daemon.client() as api:
        api.create_lun(name, size)


def fill_random(daemon: Daemon, lun: str, scratch: Path, size: int) -> None:
    """Random data over the first ``size`` bytes of ``lun`` (via qemu-img)."""
    image = random_file(scratch / f"{lun}-random.raw", size)
    run("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), daemon.uri(lun))
    image.unlink()


def save(daemon: Daemon, lun: str, path: Path) -> Path:
    """The LUN's content as a raw file."""
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", daemon.uri(lun), str(path))
    return path


def equals(daemon: Daemon, lun: str, image: Path) -> bool:
    """qemu-img compare: exit 0 identical, 1 different (anything else is an error)."""
    proc = run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", str(image), daemon.uri(lun), check=False
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def luns_equal(daemon: Daemon, a: str, b: str) -> bool:
    proc = run(
        "qemu-img", "compare", "-f", "raw", "-F", "raw", daemon.uri(a), daemon.uri(b), check=False
    )
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode == 0


def write(daemon: Daemon, lun: str, offset: int, length: int, pattern: int = 0x5A) -> None:
    qemu_io(daemon.uri(lun), f"write -P {pattern} {offset} {length}")


def bytes_written(daemon: Daemon, lun: str) -> int:
    with daemon.client() as api:
        return api.show_lun(lun).stats.bytes_written


def mirror_state(daemon: Daemon, mirror: str) -> str:
    with daemon.client() as api:
        return api.mirror(mirror).state


def chunk_files(archive: Path) -> list[Path]:
    """The archive's chunk objects (temporary files of puts excluded)."""
    return sorted(p for p in archive.glob("chunks/*/*") if not p.name.startswith("."))


def manifest_files(archive: Path) -> list[Path]:
    return sorted(p for p in archive.glob("manifests/*.json"))
