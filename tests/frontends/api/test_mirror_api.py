"""The mirror endpoints over real HTTP against a real daemon, with data over real NBD."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from lunseal.engine.backends.layers import Layer
from lunseal.frontends.api.app import DaemonContext, create_app
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.server import NbdServer
from tests.engine.mirror.test_mirror import drive, synced_pair
from tests.support.arrays import Arrays
from tests.support.daemon import Daemon
from tests.support.nbdclient import NbdClient

pytestmark = pytest.mark.daemon

KiB = 1 << 10
MiB = 1 << 20
G = 64 * KiB  # region granularity
BIG = 512 * MiB
FIELDS = {
    "id",
    "name",
    "source",
    "target",
    "state",
    "percent_done",
    "bytes_left",
    "bytes_copied",
    "source_dirty_regions",
    "target_dirty_regions",
    "granularity",
    "split_at",
    "target_access",
    "reason",
}
_counter = itertools.count()


# -- helpers ----------------------------------------------------------------------------------


class Names:
    """LUN names of one test; everything made with them is deleted afterwards."""

    def __init__(self, http: httpx.Client) -> None:
        self.http = http
        self.prefix = f"m{next(_counter)}-"

    def __call__(self, name: str) -> str:
        return self.prefix + name

    def cleanup(self) -> None:
        for m in self.http.get("/v1/mirrors").json():
            if m["source"].startswith(self.prefix) or m["target"].startswith(self.prefix):
                self.http.delete(f"/v1/mirrors/{m['name']}")
        for lun in self.http.get("/v1/luns").json():
            if lun["name"].startswith(self.prefix):
                self.http.delete(f"/v1/luns/{lun['name']}", params={"force": "true"})


@pytest.fixture
def names(http: httpx.Client) -> Iterator[Names]:
    n = Names(http)
    yield n
    n.cleanup()


def assert_error(response: httpx.Response, status: int, code: str, match: str = "") -> str:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert match in body["message"]
    return str(body["message"])


def create_lun(
    http: httpx.Client, name: str, size: str | int | None = "4M", **extra: object
) -> Any:
    response = http.post("/v1/luns", json={"name": name, "size": size, **extra})
    assert response.status_code == 201, response.text
    return response.json()


def create_mirror(http: httpx.Client, source: str, target: str, **extra: object) -> Any:
    response = http.post("/v1/mirrors", json={"source": source, "target": target, **extra})
    assert response.status_code == 201, response.text
    body = response.json()
    assert set(body) == FIELDS
    return body


def get_mirror(http: httpx.Client, name: str) -> Any:
    response = http.get(f"/v1/mirrors/{name}")
    assert response.status_code == 200, response.text
    return response.json()


def wait_state(http: httpx.Client, name: str, state: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        info = get_mirror(http, name)
        if info["state"] == state:
            return info
        assert time.monotonic() < deadline, f"mirror {name} is {info['state']}, not {state}"
        time.sleep(0.02)


def post(http: httpx.Client, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return http.post(path, json=body) if body is not None else http.post(path)


def nbd_write(daemon: Daemon, export: str, offset: int, data: bytes) -> int:
    """Write over NBD on a fresh connection; returns the NBD error (0: written)."""
    with NbdClient.connect(daemon.socket) as nbd:
        nbd.connect_export(export)
        error = nbd.write(offset, data)
        nbd.disconnect()
    return error


def nbd_read(daemon: Daemon, export: str, offset: int, length: int) -> bytes:
    with NbdClient.connect(daemon.socket) as nbd:
        nbd.connect_export(export)
        reply = nbd.read(offset, length)
        assert reply.error == 0
        nbd.disconnect()
    return reply.data


def synced(http: httpx.Client, names: Names, size: str = "4M") -> tuple[str, str]:
    src, dst = names("src"), names("dst")
    create_lun(http, src, size)
    create_mirror(http, src, dst, create_target=True)
    wait_state(http, dst, "synced")
    return src, dst


# -- create and show -------------------------------------------------------------------------------


def test_create_reports_the_initial_sync_and_then_synced(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = names("src"), names("dst")
    create_lun(http, src, "4M")
    assert nbd_write(api_daemon, src, MiB, b"\x5a" * MiB) == 0

    info = create_mirror(http, src, dst, create_target=True)
    assert info["name"] == dst  # the default name is the target's
    assert (info["source"], info["target"]) == (src, dst)
    assert info["state"] in ("syncing", "synced")
    assert info["split_at"] is None
    assert (info["target_access"], info["reason"], info["granularity"]) == ("ro", "", G)
    target = http.get(f"/v1/luns/{dst}").json()
    assert target["size"] == 4 * MiB

    done = wait_state(http, dst, "synced")
    assert done["id"] == info["id"]
    assert done["percent_done"] == 100.0
    assert done["bytes_left"] == 0
    assert done["bytes_copied"] == 4 * MiB
    assert (done["source_dirty_regions"], done["target_dirty_regions"]) == (0, 0)
    assert nbd_read(api_daemon, dst, MiB, MiB) == b"\x5a" * MiB
    assert [m["name"] for m in http.get("/v1/mirrors").json() if m["source"] == src] == [dst]


def test_the_initial_sync_is_reported_while_it_runs(
    http: httpx.Client, names: Names, tmp_path: Path
) -> None:
    """A 512 MiB source full of data: the copy takes many steps, with API requests between."""
    image = tmp_path / "big.raw"
    with image.open("wb") as f:
        for i in range(BIG // MiB):
            f.write(bytes([i % 251 + 1]) * MiB)
    src, dst = names("big"), names("bigcopy")
    create_lun(http, src, None, path=str(image))
    info = create_mirror(http, src, dst, create_target=True)
    assert info["state"] == "syncing"
    assert info["bytes_left"] == BIG
    assert info["percent_done"] == 0.0

    assert_error(post(http, f"/v1/mirrors/{dst}/split", {}), 409, "conflict", "syncing")
    assert_error(post(http, f"/v1/mirrors/{dst}/restore"), 409, "conflict", "syncing")
    assert_error(post(http, f"/v1/mirrors/{dst}/resync"), 409, "conflict", "syncing")
    seen: list[float] = []
    while (now := get_mirror(http, dst))["state"] == "syncing":
        seen.append(now["percent_done"])
        assert now["bytes_left"] <= BIG
        assert len(seen) < 5000
    assert now["state"] == "synced"
    assert seen == sorted(seen)  # progress never goes backwards
    assert now["bytes_copied"] == BIG


def test_a_mirror_is_found_by_its_name_or_its_target(http: httpx.Client, names: Names) -> None:
    src, dst = names("src"), names("dst")
    create_lun(http, src)
    create_lun(http, dst)
    info = create_mirror(http, src, dst, name=names("nightly"))
    assert info["name"] == names("nightly")
    assert get_mirror(http, dst)["id"] == info["id"]
    assert get_mirror(http, names("nightly"))["id"] == info["id"]


# -- split, resync, restore ------------------------------------------------------------------------


def test_split_resync_and_restore_copy_only_the_written_regions(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = synced(http, names)
    before = time.time()
    split = post(http, f"/v1/mirrors/{dst}/split", {"target_access": "rw"})
    assert split.status_code == 200, split.text
    info = split.json()
    assert (info["state"], info["target_access"]) == ("split", "rw")
    assert before - 1 <= info["split_at"] <= time.time() + 1

    assert nbd_write(api_daemon, src, G + 10, b"S" * G) == 0  # 2 regions
    assert nbd_write(api_daemon, dst, 3 * MiB, b"T" * 4096) == 0  # 1 region
    info = get_mirror(http, dst)
    assert (info["source_dirty_regions"], info["target_dirty_regions"]) == (2, 1)
    assert info["bytes_left"] == 3 * G

    resync = post(http, f"/v1/mirrors/{dst}/resync")
    assert resync.status_code == 200, resync.text
    assert resync.json()["state"] in ("resyncing", "synced")
    info = wait_state(http, dst, "synced")
    assert info["bytes_copied"] == 3 * G
    assert nbd_read(api_daemon, dst, 0, 4 * MiB) == nbd_read(api_daemon, src, 0, 4 * MiB)
    assert nbd_write(api_daemon, dst, 0, b"x") == c.EPERM

    info = post(http, f"/v1/mirrors/{dst}/split", {}).json()
    assert (info["state"], info["target_access"]) == ("split", "ro")
    assert nbd_write(api_daemon, dst, 0, b"x") == c.EPERM
    backup = nbd_read(api_daemon, dst, 0, 4 * MiB)
    assert nbd_write(api_daemon, src, 2 * MiB, b"damage" * 1000) == 0
    restore = post(http, f"/v1/mirrors/{dst}/restore")
    assert restore.status_code == 200, restore.text
    assert restore.json()["state"] in ("restoring", "split")
    info = wait_state(http, dst, "split")
    assert info["bytes_copied"] == G
    assert info["split_at"] is not None
    assert nbd_read(api_daemon, src, 0, 4 * MiB) == backup


def test_split_defaults_to_a_read_only_target_and_takes_no_body(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    _, dst = synced(http, names)
    response = http.post(f"/v1/mirrors/{dst}/split")
    assert response.status_code == 200, response.text
    assert response.json()["target_access"] == "ro"
    assert nbd_write(api_daemon, dst, 0, b"x") == c.EPERM


def test_wrong_state_requests_are_conflicts(http: httpx.Client, names: Names) -> None:
    _, dst = synced(http, names)
    assert_error(post(http, f"/v1/mirrors/{dst}/restore"), 409, "conflict", "synced")
    assert_error(post(http, f"/v1/mirrors/{dst}/resync"), 409, "conflict", "synced")
    assert post(http, f"/v1/mirrors/{dst}/split", {}).status_code == 200
    assert_error(post(http, f"/v1/mirrors/{dst}/split", {}), 409, "conflict", "split")
    assert get_mirror(http, dst)["state"] == "split"


# -- errors ----------------------------------------------------------------------------------------


def test_unknown_mirrors_are_404(http: httpx.Client) -> None:
    assert_error(http.get("/v1/mirrors/no-such-mirror"), 404, "not_found", "no-such-mirror")
    for action in ("split", "resync", "restore"):
        response = post(http, f"/v1/mirrors/no-such-mirror/{action}", {})
        assert_error(response, 404, "not_found", "no-such-mirror")
    assert_error(http.delete("/v1/mirrors/no-such-mirror"), 404, "not_found")


def test_create_with_unknown_luns_is_404(http: httpx.Client, names: Names) -> None:
    create_lun(http, names("src"))
    response = http.post("/v1/mirrors", json={"source": names("nope"), "target": names("x")})
    assert_error(response, 404, "not_found", names("nope"))
    response = http.post("/v1/mirrors", json={"source": names("src"), "target": names("x")})
    assert_error(response, 404, "not_found", "create_target")
    assert http.get(f"/v1/luns/{names('x')}").status_code == 404


def test_create_refuses_bad_pairs_with_400(http: httpx.Client, names: Names) -> None:
    create_lun(http, names("src"), "4M")
    create_lun(http, names("small"), "2M")
    response = http.post("/v1/mirrors", json={"source": names("src"), "target": names("small")})
    assert_error(response, 400, "invalid_argument", "same size")
    response = http.post("/v1/mirrors", json={"source": names("src"), "target": names("src")})
    assert_error(response, 400, "invalid_argument", "itself")
    response = http.post("/v1/mirrors", json={"source": names("src")})
    assert_error(response, 400, "invalid_argument", "target")
    response = http.post(
        "/v1/mirrors", json={"source": names("src"), "target": names("small"), "name": "a b"}
    )
    assert_error(response, 400, "invalid_argument")
    assert [m for m in http.get("/v1/mirrors").json() if m["source"] == names("src")] == []


def test_bad_target_access_is_400(http: httpx.Client, names: Names) -> None:
    _, dst = synced(http, names)
    response = post(http, f"/v1/mirrors/{dst}/split", {"target_access": "wo"})
    assert_error(response, 400, "invalid_argument", "target_access")
    assert get_mirror(http, dst)["state"] == "synced"


def test_a_target_already_in_a_mirror_is_409(http: httpx.Client, names: Names) -> None:
    src, dst = synced(http, names)
    create_lun(http, names("other"))
    response = http.post(
        "/v1/mirrors", json={"source": names("other"), "target": dst, "name": names("m2")}
    )
    assert_error(response, 409, "conflict", "already belongs")
    response = http.post("/v1/mirrors", json={"source": dst, "target": names("other")})
    assert_error(response, 409, "conflict", "target of mirror")
    response = http.post("/v1/mirrors", json={"source": src, "target": names("other"), "name": dst})
    assert_error(response, 409, "conflict", "already exists")


def test_a_refused_create_target_leaves_no_new_lun_behind(http: httpx.Client, names: Names) -> None:
    src, dst = synced(http, names)
    response = http.post(
        "/v1/mirrors",
        json={"source": src, "target": names("fresh"), "name": dst, "create_target": True},
    )
    assert_error(response, 409, "conflict", "already exists")
    assert_error(http.get(f"/v1/luns/{names('fresh')}"), 404, "not_found")


def test_luns_in_a_mirror_are_deleted_only_with_force_and_cannot_grow(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = synced(http, names)
    for lun in (src, dst):
        assert_error(http.delete(f"/v1/luns/{lun}"), 409, "conflict", "mirror")
        assert_error(http.post(f"/v1/luns/{lun}/grow", json={"size": "8M"}), 409, "conflict")
    assert get_mirror(http, dst)["state"] == "synced"

    assert http.delete(f"/v1/luns/{dst}", params={"force": "true"}).status_code == 204
    assert_error(http.get(f"/v1/mirrors/{dst}"), 404, "not_found")
    assert http.get(f"/v1/luns/{src}").status_code == 200
    assert nbd_write(api_daemon, src, 0, b"the source lives on") == 0


# -- delete ----------------------------------------------------------------------------------------


def test_delete_keeps_both_luns_and_frees_the_target(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = synced(http, names)
    assert nbd_write(api_daemon, dst, 0, b"x") == c.EPERM
    response = http.delete(f"/v1/mirrors/{dst}")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(http.get(f"/v1/mirrors/{dst}"), 404, "not_found")
    assert http.get(f"/v1/luns/{src}").status_code == 200
    assert http.get(f"/v1/luns/{dst}").status_code == 200
    assert nbd_write(api_daemon, dst, 0, b"target only") == 0
    assert nbd_write(api_daemon, src, 0, b"source only") == 0
    assert nbd_read(api_daemon, dst, 0, 11) == b"target only"
    # Both are free for new mirrors again (dst holds data: with force).
    create_mirror(http, src, dst, force=True)


# -- guards, lookup by id, what a copy will move ----------------------------------------------


def test_create_over_a_target_holding_data_needs_force(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = names("src"), names("dst")
    create_lun(http, src)
    create_lun(http, dst)
    assert nbd_write(api_daemon, dst, 2 * MiB, b"precious" * 512) == 0
    refused = http.post("/v1/mirrors", json={"source": src, "target": dst})
    message = assert_error(refused, 409, "conflict", f"target LUN {dst} is not empty")
    assert f"data at byte {2 * MiB}" in message
    assert "force" in message
    assert dst not in {m["target"] for m in http.get("/v1/mirrors").json()}
    assert nbd_read(api_daemon, dst, 2 * MiB, 8) == b"precious"  # untouched
    create_mirror(http, src, dst, force=True)
    wait_state(http, dst, "synced")
    assert nbd_read(api_daemon, dst, 2 * MiB, 8) == bytes(8)


def test_restore_while_hosts_use_the_source_needs_force(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = synced(http, names)
    post(http, f"/v1/mirrors/{dst}/split")
    assert nbd_write(api_daemon, src, 0, b"new" * 100) == 0
    with NbdClient.connect(api_daemon.socket) as host:
        host.connect_export(src)
        refused = post(http, f"/v1/mirrors/{dst}/restore")
        message = assert_error(refused, 409, "conflict", f"would rewrite LUN {src}")
        assert "1 host connection(s)" in message
        assert "unix pid" in message
        assert get_mirror(http, dst)["state"] == "split"
        lun = http.get(f"/v1/luns/{src}").json()
        assert lun["connections"] == 1
        assert lun["clients"][0].startswith("unix pid ")
        forced = post(http, f"/v1/mirrors/{dst}/restore", {"force": True})
        assert forced.status_code == 200, forced.text
        wait_state(http, dst, "split")
        host.disconnect()
    assert nbd_read(api_daemon, src, 0, 300) == bytes(300)


def test_the_id_status_prints_names_the_mirror_everywhere(http: httpx.Client, names: Names) -> None:
    _src, dst = synced(http, names)
    mirror_id = get_mirror(http, dst)["id"]
    assert get_mirror(http, mirror_id)["name"] == dst
    assert post(http, f"/v1/mirrors/{mirror_id}/split").status_code == 200
    assert post(http, f"/v1/mirrors/{mirror_id}/resync").status_code == 200
    wait_state(http, mirror_id, "synced")
    assert http.delete(f"/v1/mirrors/{mirror_id}").status_code == 204


def test_regions_name_what_the_next_copy_moves(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    src, dst = synced(http, names)
    assert http.get(f"/v1/mirrors/{dst}/regions").json() == {"granularity": G, "extents": []}
    post(http, f"/v1/mirrors/{dst}/split", {"target_access": "rw"})
    assert nbd_write(api_daemon, src, G + 10, b"S" * G) == 0  # regions 1 and 2
    assert nbd_write(api_daemon, dst, 3 * MiB, b"T" * 4096) == 0
    regions = http.get(f"/v1/mirrors/{dst}/regions").json()
    assert regions["extents"] == [
        {"offset": G, "length": 2 * G},
        {"offset": 3 * MiB, "length": G},
    ]


def test_a_target_hosts_cannot_write_shows_as_read_only_with_the_reason(
    http: httpx.Client, names: Names
) -> None:
    src, dst = synced(http, names)
    post(http, f"/v1/mirrors/{dst}/split")
    lun = http.get(f"/v1/luns/{dst}").json()
    assert lun["read_only"] is True
    assert lun["read_only_reason"] == f"it is the target of mirror {dst} (split)"
    post(http, f"/v1/mirrors/{dst}/resync")
    wait_state(http, dst, "synced")
    post(http, f"/v1/mirrors/{dst}/split", {"target_access": "rw"})
    lun = http.get(f"/v1/luns/{dst}").json()
    assert (lun["read_only"], lun["read_only_reason"]) == (False, "")
    source = http.get(f"/v1/luns/{src}").json()
    assert (source["read_only"], source["read_only_reason"]) == (False, "")


def test_clients_name_tcp_peers_by_address_and_port(
    http: httpx.Client, api_daemon: Daemon, names: Names
) -> None:
    lun = names("busy")
    create_lun(http, lun)
    host, port = api_daemon.tcp.rsplit(":", 1)
    with NbdClient.connect((host, int(port))) as nbd:
        nbd.connect_export(lun)
        local_port = nbd.sock.getsockname()[1]
        assert http.get(f"/v1/luns/{lun}").json()["clients"] == [f"127.0.0.1:{local_port}"]
        nbd.disconnect()


def test_a_split_stuck_in_a_flush_does_not_stop_status_calls(tmp_path: Path) -> None:
    """split flushes both sides: on the source's worker, so while that flush hangs
    the API (same event loop) still answers a status call at once.  In-process
    app (httpx's ASGI transport on this loop), real files, real workers."""

    class StuckFlush(Layer):
        def __init__(self, inner: Any) -> None:
            super().__init__(inner)
            self.entered = threading.Event()
            self.release = threading.Event()

        def flush(self) -> None:
            self.entered.set()
            self.release.wait(5)  # reached for 5 s only when the loop runs the flush itself
            super().flush()

    arrays = Arrays(tmp_path / "data")
    array = arrays.open()
    try:
        m = synced_pair(array)
        drive(array)
        stuck = m.target.push_layer(StuckFlush)
        assert all(lun.worker is not None for lun in array.luns())
        app = create_app(DaemonContext(array=array, nbd=NbdServer(array), token="t"))

        async def scenario() -> tuple[int, bool, int]:
            transport = httpx.ASGITransport(app=app)
            headers = {"Authorization": "Bearer t"}
            async with httpx.AsyncClient(
                transport=transport, base_url="http://lunseal", headers=headers
            ) as client:
                split = asyncio.create_task(client.post(f"/v1/mirrors/{m.name}/split", json={}))
                assert await asyncio.to_thread(stuck.entered.wait, 30)
                status = await client.get(f"/v1/mirrors/{m.name}")
                answered_while_stuck = not stuck.release.is_set() and not split.done()
                stuck.release.set()
                return status.status_code, answered_while_stuck, (await split).status_code

        code, answered_while_stuck, split_code = asyncio.run(scenario())
        assert code == 200
        assert answered_while_stuck, "the status call waited for the split's flush"
        assert split_code == 200
        assert m.state == "split"
    finally:
        for lun in array.luns():
            if lun.worker is not None:
                lun.worker.stop(30)
        arrays.close()
