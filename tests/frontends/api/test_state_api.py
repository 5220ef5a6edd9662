"""State-tracking routes over real HTTP against a real daemon, with real NBD clients."""

from __future__ import annotations

import itertools
import re
import resource
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from lunseal.errors import Conflict, InvalidArgument, NotFound
from lunseal.host.client import ArrayClient
from tests.interop.helpers import lun_io as qemu_io
from tests.interop.helpers import qemu_io as raw_qemu_io
from tests.interop.helpers import wait_until
from tests.support.daemon import Daemon
from tests.support.tamper import dd
from tests.support.tools import require_tools

pytestmark = pytest.mark.daemon

KiB = 1 << 10
MiB = 1 << 20

_names = itertools.count()


def assert_error(response: httpx.Response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "message"}
    assert body["error"] == code
    assert body["message"]
    return str(body["message"])


@pytest.fixture
def lun(http: httpx.Client) -> str:
    """A fresh 8M LUN of this test's own."""
    name = f"st{next(_names)}"
    response = http.post("/v1/luns", json={"name": name, "size": "8M"})
    assert response.status_code == 201, response.text
    return name


def acquire(http: httpx.Client, lun: str, **body: object) -> dict[str, Any]:
    response = http.post(f"/v1/luns/{lun}/holds", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def token(http: httpx.Client, lun: str) -> str:
    response = http.get(f"/v1/luns/{lun}/state/token")
    assert response.status_code == 200, response.text
    value = response.json()["token"]
    assert isinstance(value, str)
    return value


def check(http: httpx.Client, lun: str, tok: str) -> dict[str, Any]:
    response = http.post(f"/v1/luns/{lun}/state/check", json={"token": tok})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    assert result["result"] in {"intact", "changed"}
    assert result["token"] == tok
    assert result["reason"]
    return result


# -- authentication ------------------------------------------------------------------------

STATE_ROUTES: list[tuple[str, str, dict[str, Any] | None]] = [
    ("GET", "/v1/luns/{lun}/state", None),
    ("GET", "/v1/luns/{lun}/state/token", None),
    ("POST", "/v1/luns/{lun}/state/check", {"token": "lst1.x.1.counter.1"}),
    ("GET", "/v1/luns/{lun}/holds", None),
    ("POST", "/v1/luns/{lun}/holds", {"hold": "intruder", "mode": "flag"}),
    ("DELETE", "/v1/luns/{lun}/holds/keeper", None),
    ("GET", "/v1/luns/{lun}/holds/keeper/changes", None),
]


@pytest.mark.parametrize("auth", [{}, {"Authorization": "Bearer wrong"}], ids=["none", "wrong"])
@pytest.mark.parametrize(
    ("method", "path", "body"), STATE_ROUTES, ids=[f"{m} {p}" for m, p, _ in STATE_ROUTES]
)
def test_state_routes_need_the_token(
    api_daemon: Daemon,
    http: httpx.Client,
    lun: str,
    auth: dict[str, str],
    method: str,
    path: str,
    body: dict[str, Any] | None,
) -> None:
    keeper = acquire(http, lun, hold="keeper", track_changes=True)
    with httpx.Client(base_url=api_daemon.api_url, headers=auth, timeout=30) as anonymous:
        response = anonymous.request(method, path.format(lun=lun), json=body)
    assert_error(response, 401, "unauthorized")
    assert response.headers["www-authenticate"] == "Bearer"
    # ... and nothing happened: still exactly the keeper's hold and token.
    assert [h["name"] for h in http.get(f"/v1/luns/{lun}/holds").json()] == ["keeper"]
    assert token(http, lun) == keeper["token"]


# -- the life of a hold ------------------------------------------------------------------------


def test_state_of_an_untracked_lun(http: httpx.Client, lun: str) -> None:
    response = http.get(f"/v1/luns/{lun}/state")
    assert response.status_code == 200
    state = response.json()
    assert state["lun"] == lun
    assert state["tracking"] is False
    assert state["token"] is None
    assert state["holds"] == []
    assert re.fullmatch(r"[0-9a-f]{16}", state["epoch"])
    assert state["epoch_reason"] == ""
    assert state["clean"] is True
    lun_uuid = http.get(f"/v1/luns/{lun}").json()["uuid"]
    assert state["lun_uuid"] == lun_uuid
    message = assert_error(http.get(f"/v1/luns/{lun}/state/token"), 409, "conflict")
    assert "tracking is off" in message
    assert http.get(f"/v1/luns/{lun}/holds").json() == []


def test_hold_life_cycle(api_daemon: Daemon, http: httpx.Client, lun: str) -> None:
    hold = acquire(http, lun)
    assert hold["name"] == "default"
    assert hold["granularity"] is None
    assert hold["changed_bytes"] is None
    assert isinstance(hold["created_at"], float)
    first = hold["token"]
    assert first.startswith("lst1.")

    state = http.get(f"/v1/luns/{lun}/state").json()
    assert state["tracking"] is True
    assert state["mode"] == "counter"
    assert state["holds"] == ["default"]
    assert state["token"] == first
    assert token(http, lun) == first
    outcome = check(http, lun, first)
    assert outcome["result"] == "intact"
    assert outcome["current"] == first
    assert outcome["lun"] == lun

    qemu_io(api_daemon, lun, "write -P 0x5a 1M 64k")
    outcome = check(http, lun, first)
    assert outcome["result"] == "changed"
    assert "data was written since the token" in outcome["reason"]
    second = outcome["current"]
    assert second != first
    assert token(http, lun) == second

    listed = http.get(f"/v1/luns/{lun}/holds").json()
    assert [(h["name"], h["token"]) for h in listed] == [("default", first)]

    response = http.delete(f"/v1/luns/{lun}/holds/default")
    assert response.status_code == 204
    assert response.content == b""
    assert_error(http.get(f"/v1/luns/{lun}/state/token"), 409, "conflict")
    outcome = check(http, lun, second)
    assert outcome["result"] == "changed"
    assert "tracking is off" in outcome["reason"]
    assert outcome["current"] is None

    again = acquire(http, lun)["token"]
    assert again not in {first, second}  # C4: no token spans the off period


@pytest.mark.parametrize("mode", ["counter", "timestamp", "flag"])
def test_modes_over_nbd(api_daemon: Daemon, http: httpx.Client, lun: str, mode: str) -> None:
    first = acquire(http, lun, hold="job", mode=mode)["token"]
    assert f".{mode}." in first
    # Reads, flushes and block-status queries change nothing.
    qemu_io(api_daemon, lun, "read 0 1M", "flush", "readv 4k 4k 4k")
    require_tools("nbdinfo")
    subprocess.run(
        ["nbdinfo", "--map", api_daemon.uri(lun)], check=True, capture_output=True, timeout=60
    )
    assert token(http, lun) == first
    assert check(http, lun, first)["result"] == "intact"
    seen = {first}
    for command in ("write -P 1 0 4k", "write -z 64k 64k", "discard 128k 64k", "write 1M 512"):
        qemu_io(api_daemon, lun, command)
        now = token(http, lun)
        assert now not in seen, command
        seen.add(now)
        assert token(http, lun) == now  # no write in between: equal, in every mode
    for old in seen - {now}:
        assert check(http, lun, old)["result"] == "changed"
    assert check(http, lun, now)["result"] == "intact"


def test_several_holds(http: httpx.Client, lun: str) -> None:
    first = acquire(http, lun, hold="backup", mode="timestamp")["token"]
    assert acquire(http, lun, hold="host")["token"] == first
    assert acquire(http, lun, hold="audit", mode="timestamp")["token"] == first
    state = http.get(f"/v1/luns/{lun}/state").json()
    assert state["mode"] == "timestamp"
    assert sorted(state["holds"]) == ["audit", "backup", "host"]
    assert http.delete(f"/v1/luns/{lun}/holds/backup").status_code == 204
    assert http.delete(f"/v1/luns/{lun}/holds/audit").status_code == 204
    assert token(http, lun) == first  # one holder leaving changes nothing for another
    assert check(http, lun, first)["result"] == "intact"


def test_grow_changes_the_token(http: httpx.Client, lun: str) -> None:
    first = acquire(http, lun, track_changes=True)["token"]
    assert http.post(f"/v1/luns/{lun}/grow", json={"size": "9M"}).status_code == 200
    assert check(http, lun, first)["result"] == "changed"
    changes = http.get(f"/v1/luns/{lun}/holds/default/changes").json()
    assert changes["extents"] == [{"offset": 8 * MiB, "length": MiB}]


def test_delete_and_recreate_same_name_and_number(http: httpx.Client) -> None:
    name = f"st{next(_names)}"
    old: list[str] = []
    for _round in range(3):
        created = http.post("/v1/luns", json={"name": name, "size": "1M", "number": 9000})
        assert created.status_code == 201, created.text
        tok = acquire(http, name)["token"]
        assert tok not in old
        for previous in old:
            outcome = check(http, name, previous)
            assert outcome["result"] == "changed"
            assert "another LUN" in outcome["reason"]
        old.append(tok)
        assert http.delete(f"/v1/luns/{name}").status_code == 204


def test_malformed_tokens_are_400_foreign_ones_changed(http: httpx.Client, lun: str) -> None:
    good = acquire(http, lun)["token"]
    for bad in ["", "nonsense", good + "x", good[:-1] + "x", good.replace("lst1", "lst2")]:
        response = http.post(f"/v1/luns/{lun}/state/check", json={"token": bad})
        message = assert_error(response, 400, "invalid_argument")
        assert "not a lunseal state token" in message
    for other in [good + "0", good.replace("counter", "flag")]:
        assert check(http, lun, other)["result"] == "changed", other
    assert check(http, lun, good)["result"] == "intact"


def test_tokens_of_two_luns_differ(http: httpx.Client, lun: str) -> None:
    other = f"st{next(_names)}"
    assert http.post("/v1/luns", json={"name": other, "size": "8M"}).status_code == 201
    a, b = acquire(http, lun)["token"], acquire(http, other)["token"]
    assert a != b
    outcome = check(http, other, a)
    assert outcome["result"] == "changed"
    assert "another LUN" in outcome["reason"]


# -- change maps ---------------------------------------------------------------------------------


def test_changes_follow_nbd_writes(api_daemon: Daemon, http: httpx.Client, lun: str) -> None:
    fine = acquire(http, lun, hold="fine", granularity="4K")
    assert fine["granularity"] == 4 * KiB
    assert fine["changed_bytes"] == 0
    coarse = acquire(http, lun, hold="coarse", track_changes=True)
    assert coarse["granularity"] == 64 * KiB
    qemu_io(api_daemon, lun, "write 4096 8192", "write -z 1M 100k", "discard 4M 4k", "read 0 8M")
    fine_changes = http.get(f"/v1/luns/{lun}/holds/fine/changes").json()
    assert fine_changes["lun"] == lun
    assert fine_changes["hold"] == "fine"
    assert fine_changes["since_token"] == fine["token"]
    assert fine_changes["granularity"] == 4 * KiB
    assert fine_changes["extents"] == [
        {"offset": 4096, "length": 8192},
        {"offset": MiB, "length": 100 * KiB},
        {"offset": 4 * MiB, "length": 4096},
    ]
    assert fine_changes["changed_bytes"] == 8192 + 100 * KiB + 4096
    coarse_changes = http.get(f"/v1/luns/{lun}/holds/coarse/changes").json()
    assert coarse_changes["extents"] == [
        {"offset": 0, "length": 64 * KiB},
        {"offset": MiB, "length": 128 * KiB},
        {"offset": 4 * MiB, "length": 64 * KiB},
    ]
    by_name = {h["name"]: h for h in http.get(f"/v1/luns/{lun}/holds").json()}
    assert by_name["fine"]["changed_bytes"] == fine_changes["changed_bytes"]
    assert by_name["coarse"]["changed_bytes"] == 256 * KiB


def test_client_methods(api_daemon: Daemon, lun: str) -> None:
    with ArrayClient(api_daemon.api_url, api_daemon.token) as api:
        assert api.state(lun).tracking is False
        with pytest.raises(Conflict):
            api.token(lun)
        hold = api.acquire_hold(lun, "inc", mode="flag", granularity="16K")
        assert hold.granularity == 16 * KiB
        assert api.token(lun).token == hold.token
        assert api.check_token(lun, hold.token).result == "intact"
        qemu_io(api_daemon, lun, "write 40k 1")
        assert api.check_token(lun, hold.token).result == "changed"
        assert [(e.offset, e.length) for e in api.changes(lun, "inc").extents] == [
            (32 * KiB, 16 * KiB)
        ]
        assert [h.name for h in api.list_holds(lun)] == ["inc"]
        with pytest.raises(Conflict):
            api.acquire_hold(lun, "inc")
        with pytest.raises(InvalidArgument):
            api.acquire_hold(lun, "x", granularity="5K")
        with pytest.raises(NotFound):
            api.release_hold(lun, "nobody")
        api.release_hold(lun, "inc")
        assert api.list_holds(lun) == []


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"), STATE_ROUTES, ids=[f"{m} {p}" for m, p, _ in STATE_ROUTES]
)
def test_unknown_lun_is_404(
    http: httpx.Client, method: str, path: str, body: dict[str, Any] | None
) -> None:
    response = http.request(method, path.format(lun="no-such-lun"), json=body)
    message = assert_error(response, 404, "not_found")
    assert "no-such-lun" in message


def test_unknown_hold_is_404(http: httpx.Client, lun: str) -> None:
    assert_error(http.delete(f"/v1/luns/{lun}/holds/nobody"), 404, "not_found")
    assert_error(http.get(f"/v1/luns/{lun}/holds/nobody/changes"), 404, "not_found")
    acquire(http, lun, hold="somebody")
    assert_error(http.delete(f"/v1/luns/{lun}/holds/nobody"), 404, "not_found")
    assert_error(http.get(f"/v1/luns/{lun}/holds/nobody/changes"), 404, "not_found")


def test_duplicate_hold_is_409(http: httpx.Client, lun: str) -> None:
    first = acquire(http, lun, hold="job")["token"]
    response = http.post(f"/v1/luns/{lun}/holds", json={"hold": "job"})
    assert "job" in assert_error(response, 409, "conflict")
    assert token(http, lun) == first


def test_mode_conflict_is_409(http: httpx.Client, lun: str) -> None:
    first = acquire(http, lun, hold="a", mode="counter")["token"]
    response = http.post(f"/v1/luns/{lun}/holds", json={"hold": "b", "mode": "timestamp"})
    assert "counter mode" in assert_error(response, 409, "conflict")
    assert [h["name"] for h in http.get(f"/v1/luns/{lun}/holds").json()] == ["a"]
    assert token(http, lun) == first


@pytest.mark.parametrize(
    "body",
    [
        {"mode": "bogus"},
        {"mode": "COUNTER"},
        {"mode": 1},
        {"granularity": "3K"},
        {"granularity": "abc"},
        {"granularity": 1000},
        {"granularity": "0"},
        {"granularity": "2G"},
        {"granularity": -4096},
        {"hold": ""},
        {"hold": "a/b"},
        {"hold": "x" * 129},
        {"hold": "tab\there"},
        {"hold": 5},
        {"track_changes": "maybe"},
    ],
)
def test_bad_acquire_is_400_and_changes_nothing(
    http: httpx.Client, lun: str, body: dict[str, Any]
) -> None:
    response = http.post(f"/v1/luns/{lun}/holds", json=body)
    assert_error(response, 400, "invalid_argument")
    assert http.get(f"/v1/luns/{lun}/state").json()["tracking"] is False


@pytest.mark.parametrize("body", [{}, {"token": 5}, {"tok": "x"}, None])
def test_bad_check_body_is_400(http: httpx.Client, lun: str, body: dict[str, Any] | None) -> None:
    acquire(http, lun)
    response = http.post(f"/v1/luns/{lun}/state/check", json=body)
    assert_error(response, 400, "invalid_argument")


def test_changes_without_a_map_is_400(http: httpx.Client, lun: str) -> None:
    acquire(http, lun, hold="plain")
    message = assert_error(http.get(f"/v1/luns/{lun}/holds/plain/changes"), 400, "invalid_argument")
    assert "change map" in message


# -- writes behind the running array, a catalog that cannot be written -----------------------------


FOREIGN = "changed by another process while the array was running"


def test_a_write_behind_the_running_daemon_is_seen_at_check(http: httpx.Client, lun: str) -> None:
    path = Path(http.get(f"/v1/luns/{lun}").json()["path"])
    tok = acquire(http, lun, hold="job", track_changes=True)["token"]
    dd(path, 4096, b"tampered")
    outcome = check(http, lun, tok)
    assert outcome["result"] == "changed"
    assert FOREIGN in outcome["reason"]
    changes = http.get(f"/v1/luns/{lun}/holds/job/changes").json()
    assert changes["changed_bytes"] == 8 * MiB  # nobody knows where: everything


def test_a_write_behind_a_dirty_lun_is_seen_by_the_checkpoint_loop(
    api_daemon: Daemon, http: httpx.Client, lun: str
) -> None:
    acquire(http, lun, hold="job")
    path = Path(http.get(f"/v1/luns/{lun}").json()["path"])
    qemu_io(api_daemon, lun, "write 0 4k")
    tok = token(http, lun)
    dd(path, 8192, b"tampered")
    # No token is asked for: the checkpoint loop alone must notice.
    wait_until(
        lambda: f"LUN {lun}: new state epoch" in api_daemon.log(),
        what="the checkpoint loop to see the foreign write",
    )
    outcome = check(http, lun, tok)
    assert outcome["result"] == "changed"
    assert FOREIGN in outcome["reason"]


def _clean(http: httpx.Client, lun: str) -> bool:
    return bool(http.get(f"/v1/luns/{lun}/state").json()["clean"])


def test_a_full_catalog_fails_writes_with_eio_and_the_api_with_503(tmp_path: Path) -> None:
    """The catalog's WAL cannot grow (a real kernel file-size limit on the daemon,
    set with prlimit): the dirty mark of a write cannot be made durable."""
    require_tools("qemu-io")
    d = Daemon(tmp_path / "home", ["--clean-after", "0.5", "--no-demo"]).start()
    assert d.proc is not None
    pid = d.proc.pid
    headers = {"Authorization": f"Bearer {d.token}"}
    try:
        with httpx.Client(base_url=d.api_url, headers=headers, timeout=30) as h:
            assert h.post("/v1/luns", json={"name": "x", "size": "4M"}).status_code == 201
            acquire(h, "x", hold="job")
            qemu_io(d, "x", "write -P 1 0 4k")
            wait_until(lambda: _clean(h, "x"), what="the LUN to be recorded clean")
            before = token(h, "x")
            wal = d.home / "catalog.sqlite-wal"
            old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (max(wal.stat().st_size, 8192), old[1]))
            try:
                refused = raw_qemu_io(d.uri("x"), "write -P 2 0 4k", check=False)
                assert refused.returncode != 0
                assert "Input/output error" in refused.stdout + refused.stderr
                response = h.post("/v1/luns/x/holds", json={"hold": "second"})
                assert "catalog failure" in assert_error(response, 503, "catalog_error")
                response = h.post("/v1/luns", json={"name": "y", "size": "4K"})
                assert_error(response, 503, "catalog_error")
                assert token(h, "x") == before  # nothing was acknowledged
            finally:
                resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
            assert d.proc.poll() is None
            assert [lun["name"] for lun in h.get("/v1/luns").json()] == ["x"]
            assert len(list((d.home / "luns").iterdir())) == 1  # no backing file left over
            qemu_io(d, "x", "read -P 1 0 4k")  # the refused write never reached the LUN
            qemu_io(d, "x", "write -P 3 0 4k")
            after = token(h, "x")
            assert after != before
            wait_until(lambda: _clean(h, "x"), what="the checkpoint loop to record the LUN")
            acquire(h, "x", hold="second")
            assert check(h, "x", before)["result"] == "changed"
    finally:
        assert d.stop() == 0, d.log()
