"""Run a real ``lunseal serve`` process for tests, on free ports, in a temp home."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from lunseal.host.client import ArrayClient

LUNSEAL = str(Path(sys.executable).with_name("lunseal"))


@dataclass
class Daemon:
    home: Path
    extra_args: list[str] = field(default_factory=list)
    #: Let LUNs use files anywhere under the temp directory (tests create them there);
    #: off to see the daemon's own default (only the data directory).
    allow_tmp: bool = True
    proc: subprocess.Popen[bytes] | None = None
    info: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 60.0) -> Daemon:
        self.home.mkdir(parents=True, exist_ok=True)
        info_file = self.home / "daemon.json"
        info_file.unlink(missing_ok=True)
        log = open(self.home / "daemon.log", "ab")  # noqa: SIM115 - owned by the process
        self.proc = subprocess.Popen(
            [
                LUNSEAL,
                "--home",
                str(self.home),
                "serve",
                "--nbd-port",
                "0",
                "--api-port",
                "0",
                "--iscsi-port",
                "0",
                "--log-level",
                "debug",
                *(["--allow-backing-dir", tempfile.gettempdir()] if self.allow_tmp else []),
                *self.extra_args,
            ],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not info_file.exists():
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"daemon did not start:\n{self.log()}")
            time.sleep(0.05)
        self.info = json.loads(info_file.read_text())
        return self

    def log(self) -> str:
        path = self.home / "daemon.log"
        return path.read_text(errors="replace") if path.exists() else ""

    @property
    def socket(self) -> str:
        return self.info["nbd_unix"]

    @property
    def tcp(self) -> str:
        return self.info["nbd_tcp"]

    @property
    def api_url(self) -> str:
        return self.info["api_url"]

    @property
    def iscsi_port(self) -> int:
        return int(self.info["iscsi_port"])

    @property
    def iscsi_portal(self) -> str:
        """``HOST:PORT`` of the iSCSI portal."""
        return self.info["iscsi_portal"]

    @property
    def iscsi_target(self) -> str:
        return self.info["iscsi_target"]

    @property
    def token(self) -> str:
        return (self.home / "api-token").read_text().strip()

    def uri(self, export: str, *, tcp: bool = False) -> str:
        if tcp:
            return f"nbd://{self.tcp}/{export}"
        return f"nbd+unix:///{export}?socket={self.socket}"

    def client(self) -> ArrayClient:
        return ArrayClient(self.api_url, self.token)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LUNSEAL, "--home", str(self.home), *args],
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
