"""Backup and restore: full vs incremental backups, restores from the mirror vs the archive.

One daemon, one 2 GiB LUN filled with random (incompressible, never repeating)
data, one mirror of it; each repetition:

1. full backup: the mirror is synced and every hold on its target released;
   ``create_backup`` into a new, empty archive repository (so nothing is
   deduplicated) -- split, hold, stream the whole target into the archive.
   Next to it, in the same repetition (the order alternates), ``qemu-img
   convert -f raw -O raw nbd+unix:///LUN?socket=... out.raw`` of the same LUN.
   MB/s of each (10^6 bytes/s) and lunseal / qemu-img (higher is better).
   qemu-img never syncs its output (cache mode ``unsafe``) while the archive
   syncs every object, so an fsync of out.raw is timed too and reported as
   a second, durable ratio.
2. incremental backup: 1% of the LUN (20 x 1 MiB of new random data at
   distinct random 1 MiB-aligned offsets, written over NBD) changes on the
   source, then ``create_backup`` again into the same repository: resync of
   the mirror (20 MiB), split, read only the changed 4 MiB chunks.  Speed-up
   = full time / incremental time (target >= 20x).
3. restore of that incremental backup into the source LUN: 1% changes on
   the source again, restore from the intact mirror (the default plan: a
   reverse resync of the changed regions, then a read-back verification of
   the whole LUN); 1% changes again, restore from the archive (``--from
   archive``: every chunk written over NBD, then the same verification).
   Ratio archive time / mirror time (expected >= 10x).

Backups and restores run in-process through the Python API
(lunseal.host.backup.create / lunseal.host.backup.restore, the code behind ``lunseal
backup create`` and ``lunseal restore``), so CLI start-up is not timed.
Medians over the repetitions; ``--json`` also writes every sample.

    .venv/bin/python bench/backup_bench.py [--reps 6] [--size 2G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from nbd_fio import environment, lunseal_running, parse_size, tool_version

from lunseal.host.archive import Manifest, Repository
from lunseal.host.backup.common import Log, no_progress, wait_mirror
from lunseal.host.backup.create import BackupResult, create_backup
from lunseal.host.backup.restore import RestorePlan, plan_restore, run_restore
from lunseal.host.client import ArrayClient
from lunseal.host.nbd_client import NbdClient

LUN = "bench"  # made by start_lunseal
MIRROR = "bench-copy"  # mirror and target LUN name (create_backup's convention)
MiB = 1 << 20
T = TypeVar("T")


# -- samples -----------------------------------------------------------------------------


@dataclass
class Steps:
    """A Log that remembers when each step was logged (seconds since ``start``)."""

    start: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str]] = field(default_factory=list)
    echo: bool = False

    def log(self) -> Log:
        return Log(say=self._say)

    def _say(self, message: str) -> None:
        self.events.append((time.monotonic() - self.start, message))
        if self.echo:
            print(f"    {self.events[-1][0]:7.3f} s  {message}", flush=True)

    def at(self, prefix: str) -> float | None:
        """Time of the first step starting with ``prefix``."""
        return next((t for t, m in self.events if m.startswith(prefix)), None)


@dataclass(frozen=True)
class RepSample:
    order: str  # which of the full backup and qemu-img ran first in this repetition
    full_s: float
    full_bytes_read: int
    full_stream_s: float  # from the hold (the split copy is ready) to the end
    qemu_img_s: float
    qemu_img_fsync_s: float  # fsync of out.raw right after (qemu-img itself never syncs)
    incr_s: float
    incr_bytes_read: int
    incr_resync_s: float  # from the request until the log says the mirror is synced
    mirror_restore_s: float
    mirror_restore_copy_s: float  # planning + reverse resync; the rest is verification
    mirror_restore_bytes: int
    archive_restore_s: float
    archive_restore_write_s: float  # planning + check + write; the rest is verification
    archive_restore_bytes: int

    @property
    def backup_ratio(self) -> float:
        return self.qemu_img_s / self.full_s  # lunseal MB/s / qemu-img MB/s

    @property
    def durable_ratio(self) -> float:
        return (self.qemu_img_s + self.qemu_img_fsync_s) / self.full_s

    @property
    def speedup(self) -> float:
        return self.full_s / self.incr_s

    @property
    def restore_ratio(self) -> float:
        return self.archive_restore_s / self.mirror_restore_s


# -- helpers -------------------------------------------------------------------------------


def timed(fn: Callable[[], T]) -> tuple[float, T]:
    start = time.monotonic()
    result = fn()
    return time.monotonic() - start, result


def fill_random(uri: str, size: int, seed: int) -> None:
    """Write every byte with pseudo-random data: incompressible, no chunk repeats."""
    rng = random.Random(seed)
    step = 4 * MiB
    with NbdClient(uri) as nbd:
        for offset in range(0, size, step):
            nbd.write(offset, rng.randbytes(min(step, size - offset)))
        nbd.flush()


def change_one_percent(uri: str, size: int, rng: random.Random) -> int:
    """Write 1% of the LUN, new random data in 1 MiB pieces at distinct aligned offsets."""
    count = max(1, size // 100 // MiB)
    with NbdClient(uri) as nbd:
        for block in sorted(rng.sample(range(size // MiB), count)):
            nbd.write(block * MiB, rng.randbytes(MiB))
        nbd.flush()
    return count * MiB


def ready_mirror(api: ArrayClient) -> None:
    """Bring the mirror back to synced and drop every hold left on its target (untimed)."""
    m = api.mirror(MIRROR)
    if m.state in ("split", "degraded"):
        api.resync_mirror(MIRROR)
    m = wait_mirror(api, MIRROR, no_progress)
    if m.state != "synced":
        raise SystemExit(f"mirror {MIRROR} is {m.state} ({m.reason}), expected synced")
    for hold in api.list_holds(MIRROR):
        api.release_hold(MIRROR, hold.name)


def qemu_img_convert(uri: str, out: Path) -> tuple[float, float]:
    """Seconds of the convert, then of an fsync of its output.

    qemu-img convert's default cache mode for the output is ``unsafe``: it
    never syncs, so the file is still in the page cache when it exits, while
    the archive syncs every object it stores.  The fsync shows the difference.
    """
    cmd = ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(out)]
    start = time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    elapsed = time.monotonic() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} -> {done.returncode}: {done.stderr}")
    fd = os.open(out, os.O_RDONLY)
    try:
        synced, _ = timed(lambda: os.fsync(fd))
    finally:
        os.close(fd)
    return elapsed, synced


def backup(
    api: ArrayClient, repo: Repository, want_mode: str, echo: bool
) -> tuple[float, BackupResult, Steps]:
    steps = Steps(echo=echo)
    elapsed, result = timed(
        lambda: create_backup(api, repo, LUN, MIRROR, log=steps.log(), progress=no_progress)
    )
    if result.mode != want_mode:
        raise SystemExit(f"backup was {result.mode}, expected {want_mode}: {result.reason}")
    return elapsed, result, steps


def restore(
    api: ArrayClient, repo: Repository, m: Manifest, force: str | None, want: str, echo: bool
) -> tuple[float, RestorePlan, Steps]:
    steps = Steps(echo=echo)

    def run() -> RestorePlan:
        plan = plan_restore(api, repo, m.id, force_from=force)
        if plan.path != want:
            raise SystemExit(f"restore would go {plan.path}, expected {want}: {plan.reason}")
        run_restore(api, repo, plan, log=steps.log(), progress=no_progress)
        return plan

    elapsed, plan = timed(run)
    return elapsed, plan, steps


def since(steps: Steps, prefix: str, total: float) -> float:
    """Seconds from the step logged with ``prefix`` to the end (``total``)."""
    t = steps.at(prefix)
    return total - t if t is not None else float("nan")


def until(steps: Steps, prefix: str) -> float:
    t = steps.at(prefix)
    return t if t is not None else float("nan")


# -- one repetition ----------------------------------------------------------------------


def repetition(
    rep: int, api: ArrayClient, uri: str, opts: argparse.Namespace, workdir: Path
) -> RepSample:
    size, echo = opts.size, opts.verbose
    rng = random.Random(opts.seed * 1000 + rep)
    repo_dir, out = workdir / f"archive-{rep}", workdir / "out.raw"
    repo = Repository.open_local(repo_dir)
    ready_mirror(api)

    def lunseal_full() -> tuple[float, BackupResult, Steps]:
        os.sync()
        return backup(api, repo, "full", echo)

    def qemu_img() -> tuple[float, float]:
        os.sync()
        elapsed = qemu_img_convert(uri, out)
        out.unlink()
        return elapsed

    if rep % 2 == 0:
        full_s, full, full_steps = lunseal_full()
        qemu_s, qemu_fsync_s = qemu_img()
    else:
        qemu_s, qemu_fsync_s = qemu_img()
        full_s, full, full_steps = lunseal_full()
    if full.bytes_read != size:
        raise SystemExit(f"full backup read {full.bytes_read} of {size} bytes")
    stored = sum(1 for c in full.manifest.chunks if c is not None)
    if stored != len(full.manifest.chunks):
        raise SystemExit(f"full backup stored {stored} of {len(full.manifest.chunks)} chunks")

    changed = change_one_percent(uri, size, rng)
    os.sync()
    incr_s, incr, incr_steps = backup(api, repo, "incremental", echo)

    change_one_percent(uri, size, rng)
    os.sync()
    mirror_s, mirror_plan, mirror_steps = restore(api, repo, incr.manifest, None, "mirror", echo)
    change_one_percent(uri, size, rng)
    os.sync()
    archive_s, archive_plan, archive_steps = restore(
        api, repo, incr.manifest, "archive", "archive", echo
    )

    sample = RepSample(
        order="lunseal first" if rep % 2 == 0 else "qemu-img first",
        full_s=full_s,
        full_bytes_read=full.bytes_read,
        full_stream_s=since(full_steps, "target ", full_s),
        qemu_img_s=qemu_s,
        qemu_img_fsync_s=qemu_fsync_s,
        incr_s=incr_s,
        incr_bytes_read=incr.bytes_read,
        incr_resync_s=until(incr_steps, f"mirror {MIRROR} synced"),
        mirror_restore_s=mirror_s,
        mirror_restore_copy_s=until(mirror_steps, "reverse resync"),
        mirror_restore_bytes=mirror_plan.mirror_bytes,
        archive_restore_s=archive_s,
        archive_restore_write_s=until(archive_steps, "wrote "),
        archive_restore_bytes=archive_plan.archive_bytes,
    )
    print(
        f"rep {rep + 1}/{opts.reps}: full {full_s:6.2f} s ({size / full_s / 1e6:5,.0f} MB/s,"
        f" stream {sample.full_stream_s:.2f} s) | qemu-img {qemu_s:5.2f} s"
        f" ({size / qemu_s / 1e6:5,.0f} MB/s; + fsync {qemu_fsync_s:.2f} s)"
        f" | ratio {sample.backup_ratio:.2f} ({sample.durable_ratio:.2f} with fsync)\n"
        f"    incremental {incr_s:6.3f} s (resync {sample.incr_resync_s:.3f} s;"
        f" {changed / MiB:,.0f} MiB changed, {incr.bytes_read / MiB:,.0f} MiB read)"
        f" | speed-up {sample.speedup:5.1f}x\n"
        f"    restore: mirror {mirror_s:6.3f} s (copy {sample.mirror_restore_copy_s:.3f} s,"
        f" {mirror_plan.mirror_bytes / MiB:,.0f} MiB) | archive {archive_s:6.3f} s"
        f" (write {sample.archive_restore_write_s:.3f} s,"
        f" {archive_plan.archive_bytes / MiB:,.0f} MiB) | ratio {sample.restore_ratio:5.1f}x",
        flush=True,
    )
    shutil.rmtree(repo_dir)
    return sample


# -- reporting -------------------------------------------------------------------------------


def med(samples: list[RepSample], key: Callable[[RepSample], float]) -> float:
    return statistics.median(key(s) for s in samples)


def spread(samples: list[RepSample], key: Callable[[RepSample], float], fmt: str) -> str:
    values = [key(s) for s in samples]
    return f"{format(min(values), fmt)}-{format(max(values), fmt)}"


def summarise(samples: list[RepSample], size: int) -> dict[str, Any]:
    full = med(samples, lambda s: s.full_s)
    qemu = med(samples, lambda s: s.qemu_img_s)
    incr = med(samples, lambda s: s.incr_s)
    mirror = med(samples, lambda s: s.mirror_restore_s)
    archive = med(samples, lambda s: s.archive_restore_s)
    return {
        "full_s": full,
        "full_mbps": size / full / 1e6,
        "full_stream_s": med(samples, lambda s: s.full_stream_s),
        "qemu_img_s": qemu,
        "qemu_img_mbps": size / qemu / 1e6,
        "backup_ratio": qemu / full,
        "qemu_img_fsync_s": med(samples, lambda s: s.qemu_img_fsync_s),
        "durable_ratio": med(samples, lambda s: s.qemu_img_s + s.qemu_img_fsync_s) / full,
        "incr_s": incr,
        "incr_resync_s": med(samples, lambda s: s.incr_resync_s),
        "incr_bytes_read": med(samples, lambda s: s.incr_bytes_read),
        "speedup": full / incr,
        "mirror_restore_s": mirror,
        "mirror_restore_copy_s": med(samples, lambda s: s.mirror_restore_copy_s),
        "mirror_restore_bytes": med(samples, lambda s: s.mirror_restore_bytes),
        "archive_restore_s": archive,
        "archive_restore_write_s": med(samples, lambda s: s.archive_restore_write_s),
        "archive_restore_bytes": med(samples, lambda s: s.archive_restore_bytes),
        "restore_ratio": archive / mirror,
        "by_order": {
            order: {
                "reps": len(group),
                "full_s": med(group, lambda s: s.full_s),
                "qemu_img_s": med(group, lambda s: s.qemu_img_s),
            }
            for order in ("lunseal first", "qemu-img first")
            if (group := [x for x in samples if x.order == order])
        },
    }


def print_table(s: dict[str, Any], samples: list[RepSample], size: int) -> None:
    mib = size // MiB

    def mbps(key: Callable[[RepSample], float]) -> str:
        values = [size / key(x) / 1e6 for x in samples]
        return f"{min(values):,.0f}-{max(values):,.0f} MB/s"

    rows = [
        (
            f"full backup, {mib:,} MiB random data",
            f"{s['full_s']:.2f} s ({s['full_mbps']:,.0f} MB/s)",
            mbps(lambda x: x.full_s),
        ),
        ("  of which streaming (after split)", f"{s['full_stream_s']:.2f} s", ""),
        (
            "qemu-img convert of the LUN to a file",
            f"{s['qemu_img_s']:.2f} s ({s['qemu_img_mbps']:,.0f} MB/s)",
            mbps(lambda x: x.qemu_img_s),
        ),
        (
            "**full backup / qemu-img** (MB/s ratio)",
            f"**{s['backup_ratio']:.2f}**",
            spread(samples, lambda x: x.backup_ratio, ".2f"),
        ),
        (
            "qemu-img convert + fsync of out.raw",
            f"{s['qemu_img_s'] + s['qemu_img_fsync_s']:.2f} s"
            f" (fsync {s['qemu_img_fsync_s']:.2f} s)",
            mbps(lambda x: x.qemu_img_s + x.qemu_img_fsync_s),
        ),
        (
            "full backup / (qemu-img + fsync)",
            f"{s['durable_ratio']:.2f}",
            spread(samples, lambda x: x.durable_ratio, ".2f"),
        ),
        (
            f"incremental backup after 1% change ({mib // 100} MiB)",
            f"{s['incr_s']:.3f} s (resync {s['incr_resync_s']:.3f} s;"
            f" {s['incr_bytes_read'] / MiB:,.0f} MiB read)",
            spread(samples, lambda x: x.incr_s, ".3f") + " s",
        ),
        (
            "**full / incremental** (target >= 20x)",
            f"**{s['speedup']:.1f}x**",
            spread(samples, lambda x: x.speedup, ".1f") + "x",
        ),
        (
            "restore from the intact mirror",
            f"{s['mirror_restore_s']:.3f} s (copy {s['mirror_restore_copy_s']:.3f} s,"
            f" {s['mirror_restore_bytes'] / MiB:,.0f} MiB)",
            spread(samples, lambda x: x.mirror_restore_s, ".3f") + " s",
        ),
        (
            "restore from the archive (--from archive)",
            f"{s['archive_restore_s']:.2f} s (write {s['archive_restore_write_s']:.2f} s,"
            f" {s['archive_restore_bytes'] / MiB:,.0f} MiB)",
            spread(samples, lambda x: x.archive_restore_s, ".2f") + " s",
        ),
        (
            "**archive / mirror restore** (expected >= 10x)",
            f"**{s['restore_ratio']:.1f}x**",
            spread(samples, lambda x: x.restore_ratio, ".1f") + "x",
        ),
    ]
    print("| measurement | median | range |")
    print("|---|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print()
    for order, g in s["by_order"].items():
        print(
            f"{order} ({g['reps']} reps): full backup {g['full_s']:.2f} s,"
            f" qemu-img convert {g['qemu_img_s']:.2f} s (medians)"
        )


# -- main --------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--reps", type=int, default=6, help="repetitions (default 6: even, both orders alike)"
    )
    p.add_argument("--size", type=parse_size, default="2G", help="LUN size (default 2G)")
    p.add_argument("--seed", type=int, default=1, help="seed of the data and offsets (default 1)")
    p.add_argument("--verbose", action="store_true", help="print every host/backup/restore step")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    return p.parse_args(argv)


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    setup: dict[str, float] = {}
    with (
        lunseal_running(workdir, opts.size) as lunseal,
        ArrayClient.for_home(Path(lunseal.info["home"])) as api,
    ):
        print(f"filling {LUN} ({opts.size / MiB:,.0f} MiB) with random data ...", flush=True)
        setup["fill_s"], _ = timed(lambda: fill_random(lunseal.uri, opts.size, opts.seed))
        os.sync()
        print(f"creating mirror {MIRROR} ...", flush=True)
        start = time.monotonic()
        api.create_mirror(LUN, MIRROR, create_target=True)
        wait_mirror(api, MIRROR, no_progress)
        setup["initial_sync_s"] = time.monotonic() - start
        samples = [repetition(r, api, lunseal.uri, opts, workdir) for r in range(opts.reps)]
    return {
        "environment": {**environment(), "qemu-img": tool_version("qemu-img", "--version")},
        "settings": {k: str(v) for k, v in vars(opts).items()},
        "setup": setup,
        "samples": [vars(s) for s in samples],
        "summary": summarise(samples, opts.size),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lunseal-backup-", dir=opts.workdir) as tmp:
        report = run(opts, Path(tmp))
    report["wall_s"] = time.monotonic() - started
    samples = [RepSample(**x) for x in report["samples"]]
    print()
    print_table(report["summary"], samples, opts.size)
    print(f"\n{opts.reps} repetitions, {report['wall_s']:.0f} s in all")
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"results written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
