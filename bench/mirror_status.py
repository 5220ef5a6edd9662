"""`mirror status` of a 1 TiB mirror with 250k dirty regions (target <= 5 ms).

Builds a data directory with two sparse 1 TiB LUNs and a split mirror between
them whose maps hold 200k regions written on the source and 50k on the target
(64 KiB regions, random, distinct: 250k in the union), saved in the catalog as
a split mirror would have them.  Then measures, from that directory:

1. engine: the status computation the API serves (``mirror_info``) on the
   array as loaded at start-up, ``--calls`` times;
2. api: ``GET /v1/mirrors/NAME`` (what ``lunseal mirror status NAME --json``
   asks) against a real ``lunseal serve`` on that directory, through
   lunseal.host.client over loopback, ``--calls`` times (CLI start-up not timed).

Reports median, p99 and max in milliseconds.

    .venv/bin/python bench/mirror_status.py [--size 1T] [--regions 250000]
                                            [--calls 200] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from lunseal.engine.array import Array
from lunseal.engine.mirror.mirror import GRANULARITY, SOURCE, SPLIT, TARGET, MirrorRecord
from lunseal.engine.state.changemap import ChangeMap
from lunseal.frontends.api.mirror_routes import mirror_info
from lunseal.host.client import ArrayClient
from lunseal.units import parse_size

LUNSEAL = str(Path(sys.executable).with_name("lunseal"))


def build(home: Path, size: int, regions: int) -> None:
    """A split mirror whose saved maps hold ``regions`` distinct dirty regions."""
    array = Array.open(home)
    try:
        src = array.create_lun("src", size)
        dst = array.create_lun("dst", size)
        count = -(-size // GRANULARITY)
        chosen = random.Random(9).sample(range(count), regions)
        on_source = regions * 4 // 5
        maps = {side: ChangeMap(size, GRANULARITY) for side in (SOURCE, TARGET)}
        for i, region in enumerate(chosen):
            maps[SOURCE if i < on_source else TARGET].mark(region * GRANULARITY, GRANULARITY)
        rec = MirrorRecord(
            id=str(uuid.uuid4()),
            name="nightly",
            source_uuid=src.record.uuid,
            target_uuid=dst.record.uuid,
            state=SPLIT,
            created_at=time.time(),
            split_at=time.time(),
        )
        array.catalog.mirrors.save_maps(rec.id, maps)
        array.catalog.mirrors.save_mirror(rec)
    finally:
        array.close()


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "median_ms": round(statistics.median(ordered) * 1e3, 3),
        "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3),
        "max_ms": round(ordered[-1] * 1e3, 3),
    }


def engine(home: Path, calls: int, regions: int) -> dict[str, float]:
    array = Array.open(home)
    try:
        m = array.mirrors.get("nightly")
        info = mirror_info(m)
        assert info.source_dirty_regions + info.target_dirty_regions == regions, info
        samples = []
        for _ in range(calls):
            start = time.perf_counter()
            mirror_info(m)
            samples.append(time.perf_counter() - start)
        return summary(samples)
    finally:
        array.close()


def api(home: Path, calls: int, regions: int) -> dict[str, float]:
    log = open(home / "bench-daemon.log", "wb")  # noqa: SIM115 - owned by the process
    proc = subprocess.Popen(
        [LUNSEAL, "--home", str(home), "serve", "--nbd-port", "0", "--api-port", "0", "--no-demo"],
        stdout=log,
        stderr=log,
    )
    log.close()
    try:
        info_file = home / "daemon.json"
        deadline = time.monotonic() + 120
        while not info_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((home / "bench-daemon.log").read_text())
            time.sleep(0.05)
        url = json.loads(info_file.read_text())["api_url"]
        token = (home / "api-token").read_text().strip()
        with ArrayClient(url, token) as client:
            first = client.mirror("nightly")
            assert first.source_dirty_regions + first.target_dirty_regions == regions
            samples = []
            for _ in range(calls):
                start = time.perf_counter()
                client.mirror("nightly")
                samples.append(time.perf_counter() - start)
        return summary(samples)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="1T")
    parser.add_argument("--regions", type=int, default=250_000)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    size = parse_size(args.size)
    with tempfile.TemporaryDirectory(prefix="lunseal-mirror-status-") as tmp:
        home = Path(tmp) / "home"
        home.mkdir()
        build(home, size, args.regions)
        results: dict[str, Any] = {
            "size": size,
            "dirty_regions": args.regions,
            "calls": args.calls,
            "cpus": os.cpu_count(),
            "engine": engine(home, args.calls, args.regions),
            "api": api(home, args.calls, args.regions),
        }
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
