from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.daemon import Daemon
from tests.support.tools import require_tools


@pytest.fixture(autouse=True, scope="session")
def backing_lock_registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Lock-holder notes of test arrays (and the daemons they start) stay in a temp dir:
    simulated crashes leave notes behind, and they must not pile up in /run."""
    old = os.environ.get("LUNSEAL_LOCK_REGISTRY")
    os.environ["LUNSEAL_LOCK_REGISTRY"] = str(tmp_path_factory.mktemp("backing-locks"))
    yield
    if old is None:
        os.environ.pop("LUNSEAL_LOCK_REGISTRY", None)
    else:
        os.environ["LUNSEAL_LOCK_REGISTRY"] = old


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
