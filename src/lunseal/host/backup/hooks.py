"""Quiesce/thaw hooks: shell commands run around the split."""

from __future__ import annotations

import subprocess

from lunseal.errors import LunsealError

HOOK_TIMEOUT = 600.0


class HookFailed(LunsealError):
    exit_code = 9
    code = "hook_failed"


def run_hook(what: str, command: str | None) -> None:
    """Run ``command`` with the shell; a non-zero exit or a timeout raises HookFailed."""
    if not command:
        return
    try:
        done = subprocess.run(
            command, shell=True, capture_output=True, text=True, timeout=HOOK_TIMEOUT
        )
    except subprocess.TimeoutExpired:
        raise HookFailed(f"{what} hook timed out after {HOOK_TIMEOUT:.0f}s: {command}") from None
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [""]
        raise HookFailed(f"{what} hook failed (exit {done.returncode}): {command}: {detail[0]}")
