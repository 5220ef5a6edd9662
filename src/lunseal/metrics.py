"""Latency buckets the data path fills, cheaply, for the Prometheus exporter.

Kept free of any dependency: the engine records into plain integers on the
LUN's worker (one bisect and two additions per operation) and the exporter
(:mod:`lunseal.frontends.api.metrics`) reads them at scrape time.  A scrape
racing a worker may see a count without its sum yet; Prometheus tolerates
such a momentary skew, and no lock is taken on the data path.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field
from time import perf_counter

#: Upper bounds in seconds, from a page-cache hit to a stalled disk.
BOUNDS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
)


@dataclass
class Latency:
    """A histogram: per-bucket counts (the last one is +Inf) and the sum."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(BOUNDS) + 1))
    total: float = 0.0

    def since(self, start: float) -> None:
        """Record one operation that began at ``perf_counter()`` value ``start``."""
        seconds = perf_counter() - start
        self.counts[bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, operations at or below it)."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, count in zip((*BOUNDS, float("inf")), self.counts, strict=True):
            running += count
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


def new_latencies() -> dict[str, Latency]:
    return {op: Latency() for op in ("read", "write", "flush")}
