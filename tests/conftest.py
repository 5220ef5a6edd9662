from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.tools import require_tools


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    """A running daemon in a fresh data directory (with its 1G LUN 'demo')."""
    d = Daemon(tmp_path / "home").start()
    try:
        yield d
    finally:
        d.kill()


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    """Where a test's backup archive goes; backup tests need the qemu tools too."""
    require_tools("qemu-img", "qemu-io")
    return tmp_path / "archive"
