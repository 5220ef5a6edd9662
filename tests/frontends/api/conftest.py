from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support.daemon import Daemon


@pytest.fixture(scope="package")
def api_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the API tests; each test uses LUN names of its own."""
    d = Daemon(tmp_path_factory.mktemp("api") / "home").start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()  # SIGTERM: after all this, it still shuts down cleanly


@pytest.fixture(scope="package")
def http(api_daemon: Daemon) -> Iterator[httpx.Client]:
    """Authenticated raw HTTP to the daemon's API."""
    headers = {"Authorization": f"Bearer {api_daemon.token}"}
    with httpx.Client(base_url=api_daemon.api_url, headers=headers, timeout=30) as client:
        yield client
