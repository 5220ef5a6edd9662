"""``GET /metrics`` on a real daemon: parsed with Prometheus' own text parser,
values that move with real NBD I/O, holds, mirrors and connections, and the
beyond-loopback warning as a gauge and in ``lunseal status``."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lunseal.host.nbd_client import NbdClient
from tests.support.daemon import Daemon
from tests.support.tools import require_tools

pytestmark = pytest.mark.daemon

MiB = 1 << 20

#: (metric name, sorted labels) -> value
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    d = Daemon(tmp_path_factory.mktemp("metrics") / "home").start()
    yield d
    assert d.stop() == 0


@pytest.fixture
def http(daemon: Daemon) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=daemon.api_url, headers={"Authorization": f"Bearer {daemon.token}"}
    ) as client:
        yield client


def scrape(http: httpx.Client) -> Samples:
    response = http.get("/metrics")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_need_the_token(daemon: Daemon) -> None:
    with httpx.Client(base_url=daemon.api_url) as anonymous:
        assert anonymous.get("/metrics").status_code == 401
        bad = anonymous.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401


def test_lun_counters_and_latency_move_with_real_io(daemon: Daemon, http: httpx.Client) -> None:
    assert http.post("/v1/luns", json={"name": "m1", "size": "4M"}).status_code == 201
    before = scrape(http)
    assert value(before, "lunseal_lun_writes_total", lun="m1") == 0
    assert value(before, "lunseal_lun_size_bytes", lun="m1") == 4 * MiB
    assert value(before, "lunseal_lun_available", lun="m1") == 1
    assert value(before, "lunseal_info", version="0.1.0", array_id=_array_id(http)) == 1

    with NbdClient(daemon.uri("m1")) as nbd:
        during = scrape(http)
        assert value(during, "lunseal_connections", protocol="nbd") >= 1
        assert value(during, "lunseal_lun_connections", lun="m1") == 1
        for i in range(3):
            nbd.write(i * 65536, b"x" * 65536)
        nbd.flush()
        assert nbd.read(0, 4096) == b"x" * 4096

    after = scrape(http)
    assert value(after, "lunseal_lun_writes_total", lun="m1") == 3
    assert value(after, "lunseal_lun_written_bytes_total", lun="m1") == 3 * 65536
    assert value(after, "lunseal_lun_reads_total", lun="m1") >= 1
    assert value(after, "lunseal_lun_read_bytes_total", lun="m1") >= 4096
    assert value(after, "lunseal_lun_flushes_total", lun="m1") >= 1
    writes = value(after, "lunseal_lun_latency_seconds_count", lun="m1", op="write")
    assert writes == 3
    assert value(after, "lunseal_lun_latency_seconds_bucket", lun="m1", op="write", le="+Inf") == 3
    assert value(after, "lunseal_lun_latency_seconds_sum", lun="m1", op="write") > 0
    assert value(after, "lunseal_lun_latency_seconds_count", lun="m1", op="flush") >= 1
    assert value(after, "lunseal_lun_connections", lun="m1") == 0


def test_holds_and_token_changes(daemon: Daemon, http: httpx.Client) -> None:
    assert http.post("/v1/luns", json={"name": "m2", "size": "1M"}).status_code == 201
    start = scrape(http)
    assert value(start, "lunseal_lun_holds", lun="m2") == 0
    changes = value(start, "lunseal_lun_token_changes_total", lun="m2")

    assert http.post("/v1/luns/m2/holds", json={"hold": "backup"}).status_code in (200, 201)
    held = scrape(http)
    assert value(held, "lunseal_lun_holds", lun="m2") == 1
    assert value(held, "lunseal_lun_token_changes_total", lun="m2") > changes  # C4

    with NbdClient(daemon.uri("m2")) as nbd:
        nbd.write(0, b"y" * 512)
        nbd.flush()
    written = scrape(http)
    assert value(written, "lunseal_lun_token_changes_total", lun="m2") > value(
        held, "lunseal_lun_token_changes_total", lun="m2"
    )


def test_mirror_state_and_bytes_left(daemon: Daemon, http: httpx.Client) -> None:
    assert http.post("/v1/luns", json={"name": "m3", "size": "1M"}).status_code == 201
    body = {"source": "m3", "target": "m3-copy", "name": "mm", "create_target": True}
    assert http.post("/v1/mirrors", json=body).status_code == 201
    samples = scrape(http)
    states = {
        dict(labels)["state"]: v
        for (name, labels), v in samples.items()
        if name == "lunseal_mirror_state" and dict(labels)["mirror"] == "mm"
    }
    assert sum(states.values()) == 1
    assert set(states) >= {"syncing", "synced", "split", "degraded"}
    assert value(samples, "lunseal_mirror_bytes_left", mirror="mm") >= 0
    assert value(samples, "lunseal_mirror_degraded", mirror="mm") == 0


def test_no_exposure_on_loopback(daemon: Daemon, http: httpx.Client) -> None:
    samples = scrape(http)
    assert not [k for k in samples if k[0] == "lunseal_exposed_listener"]
    assert http.get("/v1/status").json()["warnings"] == []


def test_a_listener_beyond_loopback_is_a_warning_everywhere(tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "home", ["--nbd-listen", "0.0.0.0", "--no-iscsi"]).start()
    try:
        with httpx.Client(
            base_url=daemon.api_url, headers={"Authorization": f"Bearer {daemon.token}"}
        ) as http:
            samples = scrape(http)
            assert value(samples, "lunseal_exposed_listener", listener="NBD", address="0.0.0.0")
            warnings = http.get("/v1/status").json()["warnings"]
        assert len(warnings) == 1
        assert "NBD listens on 0.0.0.0 beyond loopback" in warnings[0]
        human = daemon.cli("status")
        assert human.returncode == 0, human.stderr
        assert "WARNING" in human.stdout
        assert "0.0.0.0" in human.stdout
        machine = json.loads(daemon.cli("status", "--json").stdout)
        assert machine["warnings"] == warnings
        log = daemon.log()
        assert "the NBD listener 0.0.0.0:" in log
        assert "listens beyond loopback and TLS is off" in log
    finally:
        assert daemon.stop() == 0


def _array_id(http: httpx.Client) -> str:
    array_id: str = http.get("/v1/status").json()["array_id"]
    return array_id


def test_qemu_io_counts_too(daemon: Daemon, http: httpx.Client) -> None:
    require_tools("qemu-io")
    assert http.post("/v1/luns", json={"name": "m4", "size": "1M"}).status_code == 201
    subprocess.run(
        ["qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", daemon.uri("m4")],
        check=True,
        capture_output=True,
        timeout=60,
    )
    samples = scrape(http)
    assert value(samples, "lunseal_lun_written_bytes_total", lun="m4") == 65536
