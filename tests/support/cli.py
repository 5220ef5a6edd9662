"""Running the real ``lunseal`` binary from tests, with a clean environment."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from tests.support.daemon import LUNSEAL, Daemon


def lunseal(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``lunseal ARGS`` with no LUNSEAL_* or COLUMNS from outside (plus ``env``)."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("LUNSEAL_")}
    base.pop("COLUMNS", None)
    return subprocess.run(
        [LUNSEAL, *args],
        capture_output=True,
        text=True,
        env={**base, **(env or {})},
        timeout=timeout,
        check=False,
    )


def cli(daemon: Daemon, *args: str) -> subprocess.CompletedProcess[str]:
    """``lunseal --home HOME ARGS`` against ``daemon``."""
    return lunseal("--home", str(daemon.home), *args)


def ok(daemon: Daemon, *args: str) -> str:
    """stdout of a command that must succeed quietly on stderr."""
    result = cli(daemon, *args)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def ok_json(daemon: Daemon, *args: str) -> Any:
    return json.loads(ok(daemon, "--json", *args))


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The single ``lunseal: error:`` line of a failed command (no traceback, no stdout)."""
    assert result.returncode == code, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lunseal: error: ")
    assert result.stdout == ""
    return lines[0]
