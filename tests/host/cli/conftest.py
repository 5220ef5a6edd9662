from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.daemon import Daemon


@pytest.fixture(scope="package")
def cli_daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the CLI tests; each test uses LUN names of its own.

    The long directory name pushes URIs and paths past 80 columns, where a
    console that folds lines would break them.
    """
    root = tmp_path_factory.mktemp("cli-home-with-a-long-name-so-paths-pass-eighty-columns")
    d = Daemon(root / "home").start()
    try:
        yield d
    finally:
        assert d.stop() == 0, d.log()  # SIGTERM: after all this, it still shuts down cleanly
