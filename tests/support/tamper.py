"""Changing a backing file the way another process would, behind the array's back."""

from __future__ import annotations

import os
from pathlib import Path


def next_tick(path: Path) -> None:
    """Wait until the kernel's file-time clock has moved past ``path``'s mtime,
    so a change made now gives the file a different stamp (bounded by count)."""
    probe = path.with_name(path.name + ".tick")
    mtime = path.stat().st_mtime_ns
    try:
        for _ in range(1_000_000):
            probe.write_bytes(b"t")
            if probe.stat().st_mtime_ns > mtime:
                return
        raise AssertionError("the file-time clock did not move")
    finally:
        probe.unlink(missing_ok=True)


def dd(path: Path, offset: int, data: bytes) -> None:
    """Another process's write into the file, as ``dd conv=notrunc`` would do it."""
    next_tick(path)
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)
