"""Prometheus metrics at ``GET /metrics`` (behind the API's bearer token).

Nothing is counted twice: a collector reads, at scrape time, the counters the
array keeps anyway (per-LUN :class:`~lunseal.engine.lun.LunStats`, the state
trackers, the mirrors, the listeners' connection sets), so the data path pays
only for the latency buckets it fills (:mod:`lunseal.metrics`).

Also here: :func:`exposure_warnings`, the listeners reachable beyond loopback
without protection, shown at start-up, in ``lunseal status`` and as
``lunseal_exposed_listener``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from lunseal import __version__
from lunseal.engine.array import Array
from lunseal.engine.mirror.mirror import MirrorState

#: (name, help, LunStats attribute) of the per-LUN counters.
LUN_COUNTERS = (
    ("lunseal_lun_reads", "read requests served", "reads"),
    ("lunseal_lun_writes", "write requests accepted", "writes"),
    ("lunseal_lun_read_bytes", "bytes read by hosts", "bytes_read"),
    ("lunseal_lun_written_bytes", "bytes written by hosts", "bytes_written"),
    ("lunseal_lun_trims", "trim requests", "trims"),
    ("lunseal_lun_zeroes", "write-zeroes requests", "zeroes"),
    ("lunseal_lun_flushes", "flush requests", "flushes"),
)


@dataclass(frozen=True)
class Exposure:
    """A data or management listener anyone on the network may use."""

    listener: str
    address: str
    why: str

    def message(self) -> str:
        return f"{self.listener} listens on {self.address} beyond loopback {self.why}"


@dataclass
class Sources:
    """What the collector reads; callables because listeners come and go."""

    array: Array
    connections: Callable[[], dict[str, int]]
    exposures: Callable[[], list[Exposure]]
    #: Configuration reloads by result ("ok", "failed").
    reloads: Callable[[], dict[str, int]] = dict


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def exposure_warnings(
    nbd: str | None,
    iscsi: str | None,
    iscsi_acl: bool,
    api: str | None,
    *,
    nbd_protected: bool = False,
    api_tls: bool = False,
) -> list[Exposure]:
    """Listeners (``host`` of each; ``None`` when off) open beyond loopback unprotected.

    NBD is exposed unless ``nbd_protected`` (TLS with verified client
    certificates, or export access control, once the daemon has them); iSCSI
    until an initiator ACL exists; the API always needs its token, but over
    plain HTTP that token crosses the network in clear."""
    out: list[Exposure] = []
    if nbd is not None and not is_loopback(nbd) and not nbd_protected:
        out.append(Exposure("NBD", nbd, "without TLS or access control"))
    if iscsi is not None and not is_loopback(iscsi) and not iscsi_acl:
        out.append(Exposure("iSCSI", iscsi, "without an initiator ACL"))
    if api is not None and not is_loopback(api) and not api_tls:
        out.append(Exposure("API", api, "over plain HTTP (the token travels in clear)"))
    return out


class ArrayCollector(Collector):
    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    def collect(self) -> Iterator[Metric]:
        yield from self._info()
        yield from self._luns()
        yield from self._mirrors()
        yield from self._listeners()

    def _info(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            "lunseal_info", "this array (always 1)", labels=["version", "array_id"]
        )
        info.add_metric([__version__, self.sources.array.array_id], 1)
        yield info
        reloads = CounterMetricFamily(
            "lunseal_config_reloads", "SIGHUP configuration reloads", labels=["result"]
        )
        for result, count in sorted(self.sources.reloads().items()):
            reloads.add_metric([result], count)
        yield reloads

    def _luns(self) -> Iterator[Metric]:
        array = self.sources.array
        luns = array.luns()
        counters = {
            name: CounterMetricFamily(name, help_text, labels=["lun"])
            for name, help_text, _ in LUN_COUNTERS
        }
        latency = HistogramMetricFamily(
            "lunseal_lun_latency_seconds",
            "time the backing storage took per request (a zero-copy read: preparing it)",
            labels=["lun", "op"],
        )
        tokens = CounterMetricFamily(
            "lunseal_lun_token_changes", "times the state token moved", labels=["lun"]
        )
        gauges = {
            "holds": GaugeMetricFamily("lunseal_lun_holds", "state holds", labels=["lun"]),
            "conns": GaugeMetricFamily(
                "lunseal_lun_connections", "hosts connected over NBD", labels=["lun"]
            ),
            "size": GaugeMetricFamily("lunseal_lun_size_bytes", "LUN size", labels=["lun"]),
            "up": GaugeMetricFamily(
                "lunseal_lun_available", "1 while the LUN can serve", labels=["lun"]
            ),
        }
        for lun in luns:
            labels = [lun.name]
            for name, _, attr in LUN_COUNTERS:
                counters[name].add_metric(labels, getattr(lun.stats, attr))
            for op, hist in lun.stats.latency.items():
                latency.add_metric([lun.name, op], hist.cumulative(), sum_value=hist.total)
            try:
                tracker = array.tracker(lun.name)
            except Exception:  # an unavailable LUN may have no tracker
                tracker = None
            tokens.add_metric(labels, tracker.token_changes if tracker else 0)
            gauges["holds"].add_metric(labels, len(tracker.holds) if tracker else 0)
            gauges["conns"].add_metric(labels, len(lun.users))
            gauges["size"].add_metric(labels, lun.size)
            gauges["up"].add_metric(labels, 1 if lun.available else 0)
        yield from counters.values()
        yield latency
        yield tokens
        yield from gauges.values()

    def _mirrors(self) -> Iterator[Metric]:
        state = GaugeMetricFamily(
            "lunseal_mirror_state", "1 for the mirror's current state", labels=["mirror", "state"]
        )
        left = GaugeMetricFamily(
            "lunseal_mirror_bytes_left", "bytes still to copy", labels=["mirror"]
        )
        degraded = GaugeMetricFamily(
            "lunseal_mirror_degraded", "1 while the mirror is degraded", labels=["mirror"]
        )
        for mirror in self.sources.array.mirrors.all():
            name = mirror.record.name
            for each in MirrorState:
                state.add_metric([name, each.value], 1 if mirror.record.state == each else 0)
            left.add_metric([name], mirror.dirty_bytes())
            degraded.add_metric([name], 1 if mirror.record.state == MirrorState.DEGRADED else 0)
        yield from (state, left, degraded)

    def _listeners(self) -> Iterator[Metric]:
        conns = GaugeMetricFamily(
            "lunseal_connections", "open client connections", labels=["protocol"]
        )
        for protocol, count in sorted(self.sources.connections().items()):
            conns.add_metric([protocol], count)
        yield conns
        exposed = GaugeMetricFamily(
            "lunseal_exposed_listener",
            "1 per listener reachable beyond loopback without protection (see lunseal status)",
            labels=["listener", "address"],
        )
        for item in self.sources.exposures():
            exposed.add_metric([item.listener, item.address], 1)
        yield exposed


def render(sources: Sources) -> tuple[bytes, str]:
    """The exposition text and its content type."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ArrayCollector(sources))
    return generate_latest(registry), CONTENT_TYPE_LATEST
