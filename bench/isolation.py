"""Isolation between LUNs: does heavy work on one LUN slow another LUN's reads?

LUN A: fio 4 KiB random reads (nbd engine) at queue depth 1 and 32, from the
page cache (A is filled first).  A is measured alone and under each load:

* ``fua``: a second process writes 1 MiB with FUA (each write durable before
  its reply: an fdatasync per write) to LUN B over one connection, back to back.
* ``sync``: a mirror sync of a filled 2 GiB LUN (``--sync-size``) onto another
  LUN, started through the API and started again as soon as it is synced (a
  new mirror onto the same target, ``force``), so a full copy runs during the
  whole measurement.  nbdkit has no mirrors; its anchor is the same amount of
  data copied into one of its exports: ``nbdcopy`` of a filled 2 GiB local file
  into a 2 GiB export, started again as soon as it is done.
* ``dd``: the machine's own share of that: ``dd conv=fsync`` of the same
  2 GiB file into a plain file next to the servers' files, again and again;
  no NBD server is involved, so what A loses here is what any copy of that
  size costs the other work on this machine (CPU for the copy and the
  writeback, the disk).

The report gives A's IOPS under load / alone and A's p99 completion latency,
and how much work the load got done meanwhile.  nbdkit's file plugin serves
its exports from one directory (``dir=``); both servers' files live in the
same directory and are filled the same way.  Runs alternate between the
servers; the table shows medians over the repetitions.

    .venv/bin/python bench/isolation.py [--duration 8] [--reps 3] [--loads fua,sync]
                                        [--json out.json]

Target (issue 9): A keeps >= 70% of its idle IOPS at QD1 and QD32 under each
load, p99 <= 2 ms.
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

from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient

DEPTHS = (1, 32)
LOADS = ("fua", "sync", "dd")
#: B's writes cycle over this much of B (so B's file stays small and allocated).
LOAD_SPAN = 256 << 20
LOAD_BLOCK = 1 << 20
#: The sync load's LUNs (lunseal) and files (nbdkit).
SYNC_SOURCE = "syncsrc"
SYNC_TARGET = "synctgt"
SYNC_MIRROR = "isosync"
#: Seconds between polls of the mirror's state while a sync runs.
SYNC_POLL = 0.05


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


def sync_lunseal(home: Path, seconds: float) -> int:
    """Mirror SYNC_SOURCE onto SYNC_TARGET again and again for ``seconds``;
    the bytes copied (a sync cut short by the deadline counts what it copied)."""
    copied = 0
    deadline = time.monotonic() + seconds
    with ArrayClient.for_home(home) as client:
        while time.monotonic() < deadline:
            # force: the target holds the previous round's copy.
            client.create_mirror(SYNC_SOURCE, SYNC_TARGET, name=SYNC_MIRROR, force=True)
            while True:
                info = client.mirror(SYNC_MIRROR)
                if info.state == "synced" or time.monotonic() >= deadline:
                    break
                time.sleep(SYNC_POLL)
            copied += info.bytes_copied
            client.delete_mirror(SYNC_MIRROR)
    return copied


def sync_nbdkit(source: Path, uri: str, seconds: float) -> int:
    """``nbdcopy`` the file ``source`` into ``uri`` again and again for
    ``seconds``; the bytes copied (a copy cut short counts nothing)."""
    copied = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        proc = subprocess.Popen(["nbdcopy", str(source), uri])
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(30)
            break
        if proc.returncode != 0:
            raise SystemExit(f"nbdcopy into {uri} failed ({proc.returncode})")
        copied += source.stat().st_size
    return copied


def copy_plain(source: Path, target: Path, seconds: float) -> int:
    """``dd`` the file ``source`` into the plain file ``target`` (synced at the
    end) again and again for ``seconds``; the bytes copied (whole copies)."""
    copied = 0
    deadline = time.monotonic() + seconds
    cmd = ["dd", f"if={source}", f"of={target}", "bs=1M", "conv=fsync", "status=none"]
    while time.monotonic() < deadline:
        proc = subprocess.Popen(cmd)
        try:
            proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.terminate()
            proc.wait(30)
            break
        copied += source.stat().st_size
    target.unlink(missing_ok=True)
    return copied


def start_load(
    kind: str, server: Server, seconds: float, opts: argparse.Namespace, workdir: Path
) -> subprocess.Popen[str]:
    cmd = [sys.executable, __file__, "--load-seconds", str(seconds)]
    if kind == "dd":
        cmd += ["--copy-plain", str(sync_source(workdir)), "--copy-to", str(workdir / "dd.out")]
    elif kind == "fua":
        span = str(min(LOAD_SPAN, opts.size) // LOAD_BLOCK * LOAD_BLOCK)
        cmd += ["--load", server.uris[1], "--load-span", span]
    elif server.name == "lunseal":
        cmd += ["--sync-lunseal", server.info["home"]]
    else:
        cmd += ["--sync-nbdkit", str(sync_source(workdir)), "--sync-uri", sync_uri(server)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)


# -- the sync load's set-up ---------------------------------------------------------------


def sync_source(workdir: Path) -> Path:
    return workdir / "nbdkit-sync-source.img"


def nbdkit_exports(workdir: Path) -> Path:
    return workdir / "nbdkit-exports"


def sync_uri(server: Server) -> str:
    return export_uri(server, SYNC_TARGET)


def export_uri(server: Server, name: str) -> str:
    """The URI of another export of ``server``."""
    first = Path(server.uri.split("?", 1)[0]).name
    return server.uri.replace(f"/{first}?", f"/{name}?")


def prepare_sync(pair: list[Server], opts: argparse.Namespace, workdir: Path) -> None:
    """Filled sources and empty targets of ``--sync-size`` for both servers (and
    the filled local file that nbdkit's and the plain copies read)."""
    size = opts.sync_size
    block = os.urandom(LOAD_BLOCK)
    with sync_source(workdir).open("wb") as f:
        for _ in range(size // LOAD_BLOCK):
            f.write(block)
    for server in pair:
        if server.name == "lunseal":
            with ArrayClient.for_home(Path(server.info["home"])) as client:
                client.create_lun(SYNC_SOURCE, size)
                client.create_lun(SYNC_TARGET, size)
            source = Server(server.name, server.uri, server.proc, server.info)
            source.uris = [export_uri(server, SYNC_SOURCE)]
            precondition(source, size, workdir)
        else:
            with (nbdkit_exports(workdir) / SYNC_TARGET).open("wb") as f:
                f.truncate(size)


# -- one measurement ---------------------------------------------------------------------


def measure_a(
    server: Server, depth: int, load: str, opts: argparse.Namespace, workdir: Path
) -> dict[str, float]:
    a_uri = server.uris[0]
    out = workdir / f"iso-{server.name}-{depth}-{load}.json"
    options = [
        "--rw=randread",
        "--bs=4k",
        f"--iodepth={depth}",
        f"--size={opts.size}",
        "--time_based",
        f"--runtime={opts.duration}",
        f"--ramp_time={opts.ramp}",
    ]
    loader = None
    if load != "alone":
        loader = start_load(load, server, opts.duration + opts.ramp + 2, opts, workdir)
    try:
        if loader is not None:
            time.sleep(1.0)  # the load is running before A starts
        job = run_fio(fio_args(a_uri, out, *options), workdir, opts.duration + opts.ramp + 60)
    finally:
        work = 0
        if loader is not None:
            stdout, _ = loader.communicate(timeout=opts.duration + opts.ramp + 120)
            if loader.returncode != 0:
                raise SystemExit(f"the {load} load failed against {server.name}")
            work = int(stdout.strip() or 0)
    read = job["read"]
    p99 = float(read["clat_ns"]["percentile"]["99.000000"]) / 1e6
    return {"iops": float(read["iops"]), "p99_ms": p99, "work": float(work)}


# -- report -------------------------------------------------------------------------------


def summarise(samples: dict[str, list[dict[str, float]]], loads: list[str]) -> list[dict[str, Any]]:
    rows = []
    for load in loads:
        for server in ("lunseal", "nbdkit"):
            for depth in DEPTHS:
                alone = samples[f"{server} qd{depth} alone"]
                loaded = samples[f"{server} qd{depth} {load}"]
                alone_iops = statistics.median(s["iops"] for s in alone)
                loaded_iops = statistics.median(s["iops"] for s in loaded)
                rows.append(
                    {
                        "load": load,
                        "server": server,
                        "depth": depth,
                        "alone_iops": alone_iops,
                        "alone_p99_ms": statistics.median(s["p99_ms"] for s in alone),
                        "loaded_iops": loaded_iops,
                        "loaded_p99_ms": statistics.median(s["p99_ms"] for s in loaded),
                        "kept": loaded_iops / alone_iops if alone_iops else float("nan"),
                        "work": statistics.median(s["work"] for s in loaded),
                    }
                )
    return rows


def work_text(load: str, work: float) -> str:
    """What the load got done during one measurement."""
    if load == "fua":
        return f"{work:,.0f} x 1 MiB FUA"
    return f"{work / (1 << 30):.1f} GiB copied"


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("load", "server", "QD", "A alone IOPS", "p99 ms", "A loaded IOPS", "p99 ms")
    head += ("kept", "load's work per run")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---", "---"] + ["---:"] * 7) + "|")
    for r in rows:
        cells = [
            r["load"],
            r["server"],
            str(r["depth"]),
            f"{r['alone_iops']:,.0f}",
            f"{r['alone_p99_ms']:.2f}",
            f"{r['loaded_iops']:,.0f}",
            f"{r['loaded_p99_ms']:.2f}",
            f"{r['kept']:.0%}",
            work_text(r["load"], r["work"]),
        ]
        print("| " + " | ".join(cells) + " |")


# -- main -------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=8, help="seconds per fio run (default 8)")
    p.add_argument("--ramp", type=int, default=1, help="fio ramp_time seconds (default 1)")
    p.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    p.add_argument("--size", type=parse_size, default="512M", help="LUN size (default 512M)")
    p.add_argument(
        "--sync-size", type=parse_size, default="2G", help="size of the synced LUN (default 2G)"
    )
    p.add_argument(
        "--loads", default=",".join(LOADS), help="comma-separated subset of: " + ", ".join(LOADS)
    )
    p.add_argument("--nbdkit-threads", type=int, default=None, help="nbdkit --threads")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    p.add_argument("--load", default=None, help=argparse.SUPPRESS)
    p.add_argument("--load-seconds", type=float, default=0.0, help=argparse.SUPPRESS)
    p.add_argument("--load-span", type=int, default=LOAD_SPAN, help=argparse.SUPPRESS)
    p.add_argument("--sync-lunseal", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sync-nbdkit", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--sync-uri", default="", help=argparse.SUPPRESS)
    p.add_argument("--copy-plain", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--copy-to", type=Path, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def selected_loads(text: str) -> list[str]:
    loads = [name for name in text.split(",") if name]
    unknown = [name for name in loads if name not in LOADS]
    if unknown or not loads:
        raise SystemExit(f"unknown load(s) {', '.join(unknown)}: use {', '.join(LOADS)}")
    return loads


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    loads = selected_loads(opts.loads)
    samples: dict[str, list[dict[str, float]]] = {}
    # Tracking off on lunseal: this measures scheduling, not the state cost
    # (bench/nbd_fio.py measures with tracking on).
    with servers(workdir, opts.size, opts.nbdkit_threads, luns=2, tracking=False) as pair:
        for server in pair:
            precondition(server, opts.size, workdir)
        if "sync" in loads or "dd" in loads:
            prepare_sync(pair, opts, workdir)
        os.sync()
        for rep in range(opts.reps):
            order = pair if rep % 2 == 0 else pair[::-1]
            for depth in DEPTHS:
                for server in order:
                    for kind in ("alone", *loads):
                        s = measure_a(server, depth, kind, opts, workdir)
                        key = f"{server.name} qd{depth} {kind}"
                        samples.setdefault(key, []).append(s)
                        print(
                            f"rep {rep + 1}/{opts.reps} {key:<24} {s['iops']:>10,.0f} IOPS"
                            f" p99 {s['p99_ms']:.2f} ms"
                            + (f" ({work_text(kind, s['work'])})" if kind != "alone" else ""),
                            flush=True,
                        )
    hidden = ("load", "sync_lunseal", "sync_nbdkit", "sync_uri", "copy_plain", "copy_to")
    return {
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(opts).items() if not k.startswith(hidden)},
        "samples": samples,
        "summary": summarise(samples, loads),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.load is not None:
        print(load(opts.load, opts.load_seconds, opts.load_span))
        return 0
    if opts.sync_lunseal is not None:
        print(sync_lunseal(opts.sync_lunseal, opts.load_seconds))
        return 0
    if opts.sync_nbdkit is not None:
        print(sync_nbdkit(opts.sync_nbdkit, opts.sync_uri, opts.load_seconds))
        return 0
    if opts.copy_plain is not None and opts.copy_to is not None:
        print(copy_plain(opts.copy_plain, opts.copy_to, opts.load_seconds))
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
