"""Isolation between LUNs: does one host's heavy writing slow another LUN's reads?

LUN A: fio 4 KiB random reads (nbd engine) at queue depth 1 and 32, from the
page cache (A is filled first).  LUN B: a second process writing 1 MiB with FUA
(each write durable before its reply: an fdatasync per write) over one
connection, back to back.  A is measured alone and while B is loaded; the
report gives A's IOPS under load / alone and A's p99 completion latency.  The
same runs against nbdkit's file plugin serving two exports (``dir=``); both
servers' files live in the same directory and are filled the same way.  Runs
alternate between the servers; the table shows medians over the repetitions.

    .venv/bin/python bench/isolation.py [--duration 8] [--reps 3] [--json out.json]

Target (issue 9): A keeps >= 70% of its idle IOPS at QD1 and QD32 while B
writes, p99 <= 2 ms.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from nbd_fio import (
    Server,
    environment,
    fio_args,
    parse_size,
    precondition,
    run_fio,
    servers,
)

from lunseal.host.nbd_client import NbdClient

DEPTHS = (1, 32)
#: B's writes cycle over this much of B (so B's file stays small and allocated).
LOAD_SPAN = 256 << 20
LOAD_BLOCK = 1 << 20


# -- the load on B ---------------------------------------------------------------------


def load(uri: str, seconds: float, span: int) -> int:
    """Write 1 MiB with FUA, back to back, for ``seconds``; the count written."""
    data = os.urandom(LOAD_BLOCK)
    done = 0
    deadline = time.monotonic() + seconds
    with NbdClient(uri) as client:
        while time.monotonic() < deadline:
            client.write((done * LOAD_BLOCK) % span, data, fua=True)
            done += 1
    return done


def start_load(uri: str, seconds: float, size: int) -> subprocess.Popen[str]:
    span = str(min(LOAD_SPAN, size) // LOAD_BLOCK * LOAD_BLOCK)
    cmd = [sys.executable, __file__, "--load", uri, "--load-seconds", str(seconds)]
    cmd += ["--load-span", span]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


# -- one measurement ---------------------------------------------------------------------


def measure_a(
    server: Server, depth: int, loaded: bool, opts: argparse.Namespace, workdir: Path
) -> dict[str, float]:
    a_uri, b_uri = server.uris[0], server.uris[1]
    out = workdir / f"iso-{server.name}-{depth}-{int(loaded)}.json"
    options = [
        "--rw=randread",
        "--bs=4k",
        f"--iodepth={depth}",
        f"--size={opts.size}",
        "--time_based",
        f"--runtime={opts.duration}",
        f"--ramp_time={opts.ramp}",
    ]
    loader = start_load(b_uri, opts.duration + opts.ramp + 2, opts.size) if loaded else None
    try:
        if loader is not None:
            time.sleep(1.0)  # the load is running before A starts
        job = run_fio(fio_args(a_uri, out, *options), workdir, opts.duration + opts.ramp + 60)
    finally:
        writes = 0
        if loader is not None:
            stdout, _ = loader.communicate(timeout=opts.duration + opts.ramp + 60)
            if loader.returncode != 0:
                raise SystemExit(f"the load on B failed against {server.name}")
            writes = int(stdout.strip() or 0)
    read = job["read"]
    p99 = float(read["clat_ns"]["percentile"]["99.000000"]) / 1e6
    return {"iops": float(read["iops"]), "p99_ms": p99, "b_writes": float(writes)}


# -- report -------------------------------------------------------------------------------


def summarise(samples: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for server in ("lunseal", "nbdkit"):
        for depth in DEPTHS:
            alone = samples[f"{server} qd{depth} alone"]
            loaded = samples[f"{server} qd{depth} loaded"]
            alone_iops = statistics.median(s["iops"] for s in alone)
            loaded_iops = statistics.median(s["iops"] for s in loaded)
            rows.append(
                {
                    "server": server,
                    "depth": depth,
                    "alone_iops": alone_iops,
                    "alone_p99_ms": statistics.median(s["p99_ms"] for s in alone),
                    "loaded_iops": loaded_iops,
                    "loaded_p99_ms": statistics.median(s["p99_ms"] for s in loaded),
                    "kept": loaded_iops / alone_iops if alone_iops else float("nan"),
                    "b_writes": statistics.median(s["b_writes"] for s in loaded),
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("server", "QD", "A alone IOPS", "p99 ms", "A with B IOPS", "p99 ms", "kept")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * 6) + "|")
    for r in rows:
        cells = [
            r["server"],
            str(r["depth"]),
            f"{r['alone_iops']:,.0f}",
            f"{r['alone_p99_ms']:.2f}",
            f"{r['loaded_iops']:,.0f}",
            f"{r['loaded_p99_ms']:.2f}",
            f"{r['kept']:.0%}",
        ]
        print("| " + " | ".join(cells) + " |")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds per fio run (default 8)")
    p.add_argument("--ramp", type=int, default=1, help="fio ramp_time seconds (default 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--size", type=parse_size, default="512M", help="LUN size (default 512M)")
    p.add_argument("--nbdkit-threads", type=int, default=None, help="nbdkit --threads")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--load-span", type=int, default=LOAD_SPAN, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    samples: dict[str, list[dict[str, float]]] = {}
    # Tracking off on lunseal: this measures scheduling, not the state cost
    # (bench/nbd_fio.py measures with tracking on).
    with servers(workdir, opts.size, opts.nbdkit_threads, luns=2, tracking=False) as pair:
        for server in pair:
            precondition(server, opts.size, workdir)
        os.sync()
        for rep in range(opts.reps):
            order = pair if rep % 2 == 0 else pair[::-1]
            for depth in DEPTHS:
                for server in order:
                    for loaded in (False, True):
                        s = measure_a(server, depth, loaded, opts, workdir)
                        key = f"{server.name} qd{depth} {'loaded' if loaded else 'alone'}"
                        samples.setdefault(key, []).append(s)
                        print(
                            f"rep {rep + 1}/{opts.reps} {key:<24} {s['iops']:>10,.0f} IOPS"
                            f" p99 {s['p99_ms']:.2f} ms"
                            + (f" (B: {s['b_writes']:.0f} x 1 MiB FUA)" if loaded else ""),
                            flush=True,
                        )
    return {
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(opts).items() if not k.startswith("load")},
        "samples": samples,
        "summary": summarise(samples),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.load is not None:
        print(load(opts.load, opts.load_seconds, opts.load_span))
        return 0
    with tempfile.TemporaryDirectory(prefix="lunseal-iso-", dir=opts.workdir) as tmp:
        report = run(opts, Path(tmp))
    print()
    print_table(report["summary"])
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
