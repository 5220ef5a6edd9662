"""Allowed backing directories and SIGHUP: a LUN's own file (``path=``) only under a
directory the administrator allowed; a reload applies a good file and keeps the
old settings after a bad one."""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.support.daemon import Daemon

pytestmark = pytest.mark.daemon

MiB = 1 << 20


def create(http: httpx.Client, name: str, path: Path) -> httpx.Response:
    return http.post("/v1/luns", json={"name": name, "size": "1M", "path": str(path)})


def refused(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    message: str = response.json()["message"]
    assert "allowed backing directories" in message
    assert "allowed_backing_dirs" in message
    assert "--allow-backing-dir" in message
    return message


@pytest.fixture
def api(tmp_path: Path) -> Iterator[tuple[Daemon, httpx.Client, Path]]:
    """A daemon whose only allowed backing directory comes from its config file."""
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    config = tmp_path / "lunseal.toml"
    config.write_text(f"[serve]\nallowed_backing_dirs = ['{allowed}']\n")
    daemon = Daemon(tmp_path / "home", ["--config", str(config)], allow_tmp=False).start()
    try:
        with httpx.Client(
            base_url=daemon.api_url, headers={"Authorization": f"Bearer {daemon.token}"}
        ) as http:
            yield daemon, http, config
    finally:
        assert daemon.stop() == 0


def test_without_any_allowed_directory_only_the_data_directory_serves(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home", allow_tmp=False).start()
    try:
        with httpx.Client(
            base_url=daemon.api_url, headers={"Authorization": f"Bearer {daemon.token}"}
        ) as http:
            message = refused(create(http, "outside", tmp_path / "disk.img"))
            assert "none configured" in message
            assert not (tmp_path / "disk.img").exists()
            # LUNs lunseal places itself still work.
            ok = http.post("/v1/luns", json={"name": "inside", "size": "1M"})
            assert ok.status_code == 201, ok.text
    finally:
        assert daemon.stop() == 0


def test_only_files_under_an_allowed_directory(
    api: tuple[Daemon, httpx.Client, Path], tmp_path: Path
) -> None:
    _, http, _ = api
    allowed = tmp_path / "allowed"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "disk.img").write_bytes(bytes(MiB))
    (allowed / "escape").symlink_to(outside)

    refused(create(http, "a", outside / "disk.img"))
    refused(create(http, "b", allowed / ".." / "outside" / "disk.img"))
    refused(create(http, "c", allowed / "escape" / "disk.img"))  # a symlinked directory
    refused(create(http, "d", Path("/etc/passwd")))
    ok = create(http, "inside", allowed / "new.img")
    assert ok.status_code == 201, ok.text
    assert (allowed / "new.img").stat().st_size == MiB

    # Re-pointing is held to the same rule.
    repoint = http.post("/v1/luns/inside/repoint", json={"path": str(outside / "disk.img")})
    refused(repoint)


def reload(daemon: Daemon, expect: str, count: int) -> None:
    """SIGHUP and wait for the ``count``-th log line containing ``expect``."""
    assert daemon.proc is not None
    os.kill(daemon.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while daemon.log().count(expect) < count:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


def test_sighup_applies_a_good_file_and_keeps_the_old_settings_after_a_bad_one(
    api: tuple[Daemon, httpx.Client, Path], tmp_path: Path
) -> None:
    daemon, http, config = api
    other = tmp_path / "other"
    other.mkdir()
    refused(create(http, "early", other / "early.img"))

    config.write_text(f"[serve]\nallowed_backing_dirs = ['{other}']\nlog_level = 'info'\n")
    reload(daemon, "SIGHUP: reloaded", 1)
    line = next(li for li in daemon.log().splitlines() if "SIGHUP: reloaded" in li)
    assert "log level" not in line  # --log-level debug on the command line wins over the file
    assert create(http, "now", other / "now.img").status_code == 201
    refused(create(http, "old", tmp_path / "allowed" / "old.img"))

    config.write_text("[serve]\nallowed_backing_dirs = 'not a list'\n")
    reload(daemon, "SIGHUP: configuration not reloaded", 1)
    assert "serve.allowed_backing_dirs must be a list" in daemon.log()
    assert create(http, "still", other / "still.img").status_code == 201
    assert daemon.proc is not None
    assert daemon.proc.poll() is None


def test_sighup_without_a_config_file_changes_nothing(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home").start()
    try:
        reload(daemon, "no configuration file", 1)
        with daemon.client() as client:
            assert client.status().luns == 1
    finally:
        assert daemon.stop() == 0


def test_reload_applies_the_log_level_and_a_failing_hook_changes_nothing(
    tmp_path: Path,
) -> None:
    # In-process: the test daemon always passes --log-level, which wins over a file.
    from lunseal.daemon import DaemonConfig, Reloader
    from lunseal.engine.array import Array
    from lunseal.errors import InvalidArgument

    root = logging.getLogger()
    old_level = root.level
    allowed = tmp_path / "disks"
    allowed.mkdir()
    config = tmp_path / "lunseal.toml"
    config.write_text(f"[serve]\nlog_level = 'error'\nallowed_backing_dirs = ['{allowed}']\n")
    array = Array.open(tmp_path / "home")
    try:
        reloader = Reloader(DaemonConfig(home=tmp_path / "home", config_file=config), array)
        seen: list[dict[str, object]] = []

        def tls(new: dict[str, object]) -> str:
            seen.append(new)
            return "TLS certificates"

        reloader.hooks.append(tls)
        reloader.reload()
        assert root.level == logging.ERROR
        assert array.allowed_backing_dirs == (allowed.resolve(),)
        assert seen[-1]["log_level"] == "error"
        assert reloader.reloads == 1

        def broken(new: dict[str, object]) -> str:
            raise InvalidArgument("cannot load the new certificate")

        reloader.hooks.append(broken)
        config.write_text("[serve]\nlog_level = 'debug'\nallowed_backing_dirs = []\n")
        reloader.reload()
        assert root.level == logging.ERROR  # nothing of the new file was applied
        assert array.allowed_backing_dirs == (allowed.resolve(),)
        assert reloader.failures == 1
    finally:
        array.close()
        root.setLevel(old_level)
