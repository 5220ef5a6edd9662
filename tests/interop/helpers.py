"""Shared pieces of the interop tests: bounded subprocess calls and test data."""

from __future__ import annotations

import hashlib
import os
import pty
import select
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.daemon import Daemon
from tests.support.tools import require_tools

MiB = 1 << 20

#: Every external tool gets at most this long; a hang is a failure, not a stuck CI job.
TOOL_TIMEOUT = 90.0


def run(
    *args: str,
    timeout: float = TOOL_TIMEOUT,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run a tool with a timeout; with ``check``, fail with its output on a non-zero exit."""
    proc = subprocess.run(
        list(args), capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(args)} exited {proc.returncode}\n"
            f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
        )
    return proc


def random_file(path: Path, size: int) -> Path:
    """Write ``size`` bytes of os.urandom to ``path`` in 1 MiB pieces."""
    with path.open("wb") as f:
        left = size
        while left > 0:
            n = min(left, MiB)
            f.write(os.urandom(n))
            left -= n
    return path


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(MiB):
            h.update(chunk)
    return h.hexdigest()


def qemu_io(
    uri: str, *commands: str, check: bool = True, read_only: bool = False
) -> subprocess.CompletedProcess[str]:
    """qemu-io on a raw NBD image; qemu-io exits 1 when any command fails."""
    cmd = ["qemu-io", "-f", "raw", *(["-r"] if read_only else [])]
    for command in commands:
        cmd += ["-c", command]
    return run(*cmd, uri, check=check)


def wait_until(predicate: Callable[[], bool], timeout: float = 60.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        time.sleep(0.05)


class QemuIoSession:
    """An interactive qemu-io that keeps one NBD connection open between commands.

    Its output goes to a pseudo-terminal so that qemu-io prints its prompt after
    every command; the prompt marks the end of each command's output.
    """

    PROMPT = b"qemu-io> "

    def __init__(self, uri: str) -> None:
        master, slave = pty.openpty()
        self._pty = master
        self.proc = subprocess.Popen(
            ["qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE, stdout=slave, stderr=slave
        )
        os.close(slave)
        self.banner = self._until_prompt(TOOL_TIMEOUT)

    def command(self, command: str, timeout: float = TOOL_TIMEOUT) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        self.proc.stdin.flush()
        return self._until_prompt(timeout)

    def _until_prompt(self, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        buf = b""
        while not buf.endswith(self.PROMPT):
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"qemu-io gave no prompt within {timeout}s: {buf!r}")
            ready, _, _ = select.select([self._pty], [], [], left)
            if ready:
                try:
                    chunk = os.read(self._pty, 65536)
                except OSError:  # EIO: qemu-io exited and the pty is gone
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"qemu-io exited ({self.proc.poll()}): {buf!r}")
                buf += chunk
        return buf[: -len(self.PROMPT)].decode(errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(TOOL_TIMEOUT)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        os.close(self._pty)

    def __enter__(self) -> QemuIoSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lun_io(daemon: Daemon, lun: str, *commands: str) -> str:
    """qemu-io commands on a LUN of ``daemon`` over its Unix socket; they must succeed."""
    require_tools("qemu-io")
    return qemu_io(daemon.uri(lun), *commands).stdout
