"""fio's nbd engine with crc32c data verification."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.interop.helpers import MiB, qemu_io, run
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

FIO_SIZE = 64 * MiB


def _fio(uri: str, workdir: Path, *options: str) -> dict[str, Any]:
    """Run one fio job against ``uri``; return its JSON job record."""
    result = workdir / "fio.json"
    run(
        "fio",
        "--name=interop",
        "--ioengine=nbd",
        f"--uri={uri}",
        "--output-format=json",
        f"--output={result}",
        *options,
        cwd=workdir,  # fio drops its verify state files in the working directory
        timeout=120,
    )
    jobs: list[dict[str, Any]] = json.loads(result.read_text())["jobs"]
    assert len(jobs) == 1
    return jobs[0]


@pytest.mark.parametrize("tcp", [False, True], ids=["unix", "tcp"])
def test_fio_randwrite_with_crc32c_verify(daemon: Daemon, tmp_path: Path, tcp: bool) -> None:
    require_tools("fio")
    with daemon.client() as api:
        api.create_lun("disk", FIO_SIZE)

    job = _fio(
        daemon.uri("disk", tcp=tcp),
        tmp_path,
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        f"--size={FIO_SIZE}",
        "--verify=crc32c",
        "--do_verify=1",
        "--runtime=30",
    )

    assert job["error"] == 0
    assert job.get("total_err", 0) == 0
    assert job["write"]["io_bytes"] == FIO_SIZE
    # The verify pass read every block back and checked its crc32c header.
    assert job["read"]["io_bytes"] == FIO_SIZE


def test_fio_detects_corruption(daemon: Daemon, tmp_path: Path) -> None:
    """The verify above can fail: data overwritten between write and verify is reported."""
    require_tools("fio", "qemu-io")
    with daemon.client() as api:
        api.create_lun("disk", 4 * MiB)
    uri = daemon.uri("disk")
    common = ["--rw=write", "--bs=64k", "--size=4M", "--verify=crc32c"]
    _fio(uri, tmp_path, *common, "--do_verify=0")
    qemu_io(uri, "write -P 0 1M 64k")

    proc = run(
        "fio",
        "--name=interop",
        "--ioengine=nbd",
        f"--uri={uri}",
        *common,
        "--verify_only",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode != 0
    assert "verify" in (proc.stdout + proc.stderr).lower()
