"""Mirrors: the cost of synchronous fan-out on host writes, and sync/resync times.

One daemon, one run, two measurements:

1. fan-out: fio 1 MiB sequential writes, QD8, time-based, against a 2 GiB
   source LUN whose mirror is synced (every write also lands on the target
   before it is acknowledged) and against an unmirrored 2 GiB LUN of the same
   daemon; the order alternates between repetitions.  Medians, and the ratio
   mirrored / unmirrored (target >= 0.5).
2. sync: a 2 GiB LUN filled with fio's random data is mirrored onto a new
   target; the wall time from the create request until the mirror is synced
   (status polled every 50 ms) is the initial sync.  Then the mirror is split,
   1% of the LUN is written (20 x 1 MiB at distinct random 1 MiB-aligned
   offsets, qemu-io over NBD) and the wall time of the resync until synced is
   measured (polled every 5 ms: at 50 ms the figure would be the poll
   interval), with the resync's bytes_copied.  Source and target are compared
   byte for byte after each resync.  Medians, and resync / initial (target
   <= 5%).  Each repetition deletes the mirror and its target and starts over.

    .venv/bin/python bench/mirror_fio.py [--duration 10] [--reps 5] [--sync-reps 5]
                                         [--size 2G] [--json out.json]

The script drives the daemon through its management API (lunseal.host.client, the
same endpoints as `lunseal mirror ...`), so CLI start-up is not timed.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nbd_fio import (
    Sample,
    Server,
    Workload,
    environment,
    lunseal_cli,
    lunseal_running,
    measure,
    parse_size,
    precondition,
)

from lunseal.host.client import ArrayClient
from lunseal.schema.mirrors import MirrorInfo

WORKLOAD = Workload("1m-seqwrite-qd8", "write", "1m", 8)
PLAIN = "bench"  # the unmirrored LUN made by start_lunseal
MIRRORED = "msrc"  # source of the mirror measured under fio
SYNCED_SRC = "ssrc"  # source of the mirrors created and resynced in part 2
COPYING = ("syncing", "resyncing", "restoring")
MiB = 1 << 20


@dataclass(frozen=True)
class SyncSample:
    initial_s: float
    initial_not_before: float
    initial_bytes_copied: int
    dirty_bytes: int
    resync_s: float
    resync_not_before: float
    resync_bytes_copied: int

    @property
    def ratio(self) -> float:
        return self.resync_s / self.initial_s


# -- helpers ---------------------------------------------------------------------------


def nbd_uri(home: Path, lun: str) -> str:
    sock = json.loads((home / "daemon.json").read_text())["nbd_unix"]
    return f"nbd+unix:///{lun}?socket={sock}"


def make_lun(lunseal: Server, name: str, size: int) -> Server:
    home = Path(lunseal.info["home"])
    info = lunseal_cli(home, "lun", "create", name, str(size))
    extra = {"home": str(home), "path": info["path"]}
    return Server(name, nbd_uri(home, name), lunseal.proc, extra)


def check_allocated(lun: Server, size: int) -> None:
    """The fill must leave no hole, so the initial sync has to copy every byte."""
    allocated = os.stat(lun.info["path"]).st_blocks * 512
    if allocated < size:
        raise SystemExit(f"LUN {lun.name}: only {allocated} of {size} bytes allocated after fill")


@dataclass(frozen=True)
class Waited:
    seconds: float  # from the request until the first poll that saw the wanted state
    not_before: float  # ... until the last answer that still showed the copy running
    info: MirrorInfo


def wait_until(
    api: ArrayClient, name: str, want: str, start: float, poll: float, timeout: float
) -> Waited:
    """Poll the mirror until it is ``want``; times are seconds since ``start``.

    The caller has just received the answer to its request (a copying state),
    so the copy is known to be running at least until now.
    """
    not_before = time.monotonic() - start
    while True:
        info = api.mirror(name)
        now = time.monotonic() - start
        if info.state == want:
            return Waited(now, not_before, info)
        if info.state not in COPYING:
            raise SystemExit(f"mirror {name} went {info.state} ({info.reason}), wanted {want}")
        if now > timeout:
            raise SystemExit(f"mirror {name} still {info.state} after {timeout:.0f} s: {info}")
        not_before = now
        time.sleep(poll)


def expect_state(api: ArrayClient, name: str, want: str, when: str) -> MirrorInfo:
    info = api.mirror(name)
    if info.state != want:
        raise SystemExit(f"mirror {name} is {info.state} ({info.reason}) {when}, expected {want}")
    return info


def compare(a: str, b: str, workdir: Path) -> None:
    """Byte-for-byte comparison of two exports (qemu-img compare, strict)."""
    cmd = ["qemu-img", "compare", "-s", "-f", "raw", "-F", "raw", a, b]
    done = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} -> {done.returncode}: {done.stdout}{done.stderr}")


def write_one_percent(uri: str, size: int, rng: random.Random, pattern: int) -> int:
    """Write 1% of the LUN in 1 MiB pieces at distinct random aligned offsets."""
    count = max(1, size // 100 // MiB)
    offsets = sorted(rng.sample(range(size // MiB), count))
    cmd = ["qemu-io", "-f", "raw"]
    for off in offsets:
        cmd += ["-c", f"write -q -P {pattern} {off * MiB} {MiB}"]
    cmd.append(uri)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if done.returncode != 0 or done.stdout.strip() or done.stderr.strip():
        raise SystemExit(f"qemu-io failed ({done.returncode}): {done.stdout}{done.stderr}")
    return count * MiB


# -- part 1: fan-out cost --------------------------------------------------------------


def fan_out(
    lunseal: Server, api: ArrayClient, opts: argparse.Namespace, workdir: Path
) -> dict[str, list[Sample]]:
    plain = Server("unmirrored", lunseal.uri, lunseal.proc, lunseal.info)
    mirrored = make_lun(lunseal, MIRRORED, opts.size)
    mirrored.name = "mirrored"
    name = api.create_mirror(MIRRORED, f"{MIRRORED}-copy", create_target=True).name
    wait_until(api, name, "synced", time.monotonic(), opts.poll, opts.timeout)
    print("filling the mirrored and the unmirrored LUN ...", flush=True)
    for lun in (mirrored, plain):
        precondition(lun, opts.size, workdir)  # through the mirror: fills the target too
    os.sync()
    expect_state(api, name, "synced", "after the fill")

    samples: dict[str, list[Sample]] = {"mirrored": [], "unmirrored": []}
    for rep in range(opts.reps):
        order = (mirrored, plain) if rep % 2 == 0 else (plain, mirrored)
        for lun in order:
            sample = measure(lun, WORKLOAD, opts, workdir)
            samples[lun.name].append(sample)
            print(
                f"rep {rep + 1}/{opts.reps} {WORKLOAD.name} {lun.name:<10}"
                f" {sample.iops:>8,.0f} IOPS {sample.bw_bytes / 1e6:>8,.0f} MB/s",
                flush=True,
            )
        expect_state(api, name, "synced", f"after rep {rep + 1}")
    if opts.verify:
        print("comparing the mirrored source with its target ...", flush=True)
        compare(mirrored.uri, nbd_uri(Path(lunseal.info["home"]), f"{MIRRORED}-copy"), workdir)
    # Free the page cache and disk of part 1 before timing copies.
    api.delete_mirror(name)
    api.delete_lun(f"{MIRRORED}-copy", force=True)
    api.delete_lun(MIRRORED, force=True)
    return samples


# -- part 2: initial sync and resync ---------------------------------------------------


def sync_times(
    lunseal: Server, api: ArrayClient, opts: argparse.Namespace, workdir: Path
) -> list[SyncSample]:
    home = Path(lunseal.info["home"])
    source = make_lun(lunseal, SYNCED_SRC, opts.size)
    print(f"filling {SYNCED_SRC} with random data ...", flush=True)
    precondition(source, opts.size, workdir)
    check_allocated(source, opts.size)
    rng = random.Random(opts.seed)
    samples: list[SyncSample] = []
    for rep in range(opts.sync_reps):
        target = f"{SYNCED_SRC}-copy{rep + 1}"
        os.sync()  # start every copy with no writeback pending
        start = time.monotonic()
        name = api.create_mirror(SYNCED_SRC, target, create_target=True).name
        initial = wait_until(api, name, "synced", start, opts.poll, opts.timeout)
        initial_copied = initial.info.bytes_copied

        api.split_mirror(name)
        written = write_one_percent(source.uri, opts.size, rng, pattern=0x11 + rep)
        dirty = expect_state(api, name, "split", "after the 1% write").bytes_left
        if dirty != written:
            print(f"  note: {written} bytes written but {dirty} bytes dirty", flush=True)

        start = time.monotonic()
        api.resync_mirror(name)
        resync = wait_until(api, name, "synced", start, opts.resync_poll, opts.timeout)
        sample = SyncSample(
            initial.seconds,
            initial.not_before,
            initial_copied,
            dirty,
            resync.seconds,
            resync.not_before,
            resync.info.bytes_copied,
        )
        samples.append(sample)
        print(
            f"rep {rep + 1}/{opts.sync_reps} initial sync {initial.seconds:6.2f} s"
            f" (> {initial.not_before:.2f}; {initial_copied / MiB:,.0f} MiB copied);"
            f" resync {resync.seconds:5.3f} s (> {resync.not_before:.3f};"
            f" {resync.info.bytes_copied / MiB:,.0f} MiB copied); ratio {sample.ratio:.2%}",
            flush=True,
        )
        if initial_copied != opts.size:
            print(f"  note: initial sync copied {initial_copied} of {opts.size} bytes", flush=True)
        if opts.verify:
            compare(source.uri, nbd_uri(home, target), workdir)
        api.delete_mirror(name)
        api.delete_lun(target, force=True)
    return samples


# -- reporting -------------------------------------------------------------------------


def summarise(
    writes: dict[str, list[Sample]], syncs: list[SyncSample], size: int
) -> dict[str, Any]:
    mirrored = statistics.median(s.bw_bytes for s in writes["mirrored"])
    plain = statistics.median(s.bw_bytes for s in writes["unmirrored"])
    initial = statistics.median(s.initial_s for s in syncs)
    resync = statistics.median(s.resync_s for s in syncs)
    return {
        "mirrored_mbps": mirrored / 1e6,
        "unmirrored_mbps": plain / 1e6,
        "write_ratio": mirrored / plain,
        "initial_sync_s": initial,
        "initial_sync_mbps": size / initial / 1e6,
        "initial_bytes_copied": statistics.median(s.initial_bytes_copied for s in syncs),
        "resync_s": resync,
        "resync_not_before_s": statistics.median(s.resync_not_before for s in syncs),
        "initial_not_before_s": statistics.median(s.initial_not_before for s in syncs),
        "resync_bytes_copied": statistics.median(s.resync_bytes_copied for s in syncs),
        "resync_dirty_bytes": statistics.median(s.dirty_bytes for s in syncs),
        "resync_ratio": resync / initial,
    }


def spread(values: list[float], fmt: str) -> str:
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def print_table(
    s: dict[str, Any], writes: dict[str, list[Sample]], syncs: list[SyncSample], size: int
) -> None:
    mib = size // MiB
    m = [x.bw_bytes / 1e6 for x in writes["mirrored"]]
    u = [x.bw_bytes / 1e6 for x in writes["unmirrored"]]
    rows = [
        ("1m-seqwrite-qd8, unmirrored LUN", f"{s['unmirrored_mbps']:,.0f} MB/s", spread(u, ",.0f")),
        ("1m-seqwrite-qd8, synced mirror", f"{s['mirrored_mbps']:,.0f} MB/s", spread(m, ",.0f")),
        ("**mirrored / unmirrored** (target >= 0.5)", f"**{s['write_ratio']:.2f}**", ""),
        (
            f"initial sync, {mib:,} MiB random data",
            f"{s['initial_sync_s']:.2f} s (> {s['initial_not_before_s']:.2f};"
            f" {s['initial_sync_mbps']:,.0f} MB/s)",
            spread([x.initial_s for x in syncs], ".2f") + " s",
        ),
        (
            "initial sync bytes_copied",
            f"{s['initial_bytes_copied'] / MiB:,.0f} MiB",
            "",
        ),
        (
            "resync after writing 1% (dirty bytes)",
            f"{s['resync_s']:.3f} s (> {s['resync_not_before_s']:.3f};"
            f" {s['resync_dirty_bytes'] / MiB:,.0f} MiB dirty)",
            spread([x.resync_s for x in syncs], ".3f") + " s",
        ),
        ("resync bytes_copied", f"{s['resync_bytes_copied'] / MiB:,.0f} MiB", ""),
        ("**resync / initial** (target <= 5%)", f"**{s['resync_ratio']:.1%}**", ""),
    ]
    print("| measurement | median | range |")
    print("|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--ramp", type=int, default=2, help="fio ramp_time seconds (default 2)")
    p.add_argument("--reps", type=int, default=5, help="fio repetitions per LUN (default 5)")
    p.add_argument("--sync-reps", type=int, default=5, help="sync/resync repetitions (default 5)")
    p.add_argument("--size", type=parse_size, default="2G", help="LUN size (default 2G)")
    p.add_argument("--poll", type=float, default=0.05, help="status poll, initial sync (0.05 s)")
    p.add_argument("--resync-poll", type=float, default=0.005, help="status poll, resync (0.005 s)")
    p.add_argument("--timeout", type=float, default=300, help="give up on a copy after this (s)")
    p.add_argument("--seed", type=int, default=1, help="seed of the 1%% write offsets")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip comparisons")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    return p.parse_args(argv)


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    with (
        lunseal_running(workdir, opts.size) as lunseal,
        ArrayClient.for_home(Path(lunseal.info["home"])) as api,
    ):
        writes = fan_out(lunseal, api, opts, workdir)
        syncs = sync_times(lunseal, api, opts, workdir)
    return {
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(opts).items()},
        "samples": {
            "writes": {k: [vars(x) for x in v] for k, v in writes.items()},
            "syncs": [vars(x) for x in syncs],
        },
        "summary": summarise(writes, syncs, opts.size),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lunseal-mirror-", dir=opts.workdir) as tmp:
        report = run(opts, Path(tmp))
    writes = {k: [Sample(**x) for x in v] for k, v in report["samples"]["writes"].items()}
    syncs = [SyncSample(**x) for x in report["samples"]["syncs"]]
    print()
    print_table(report["summary"], writes, syncs, opts.size)
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
