"""Benchmark lunseal's iSCSI target against tgtd, over loopback.

Both targets serve a same-size LUN backed by a file in the same temporary
directory, filled with the same random bytes (lunseal's through NBD, tgt's by
copying the image to its backing file) and then ``sync``ed, so every read is
served from the page cache and no write lands on a hole: the comparison is
about the iSCSI targets, not the disk.  tgtd is started by this script without
systemd (``tgtd -f`` on a free port and its own control socket, file backing
store ``--bstype rdwr``) and stopped by its pid.

Workloads (libiscsi's ``iscsi-perf`` and qemu's iscsi:// driver):

* 4k-randread-qd32: ``iscsi-perf -r -b 8 -m 32 -t DURATION``
* 1m-seqread-qd8:   ``iscsi-perf -b 2048 -m 8 -t DURATION``
* 4k-write-qd32:    ``qemu-img bench -w -s 4096 -d 32 -c COUNT -t none``
  (sequential 4 KiB writes; ``-t none`` leaves the write cache on, so qemu
  sends no FUA, to either target; COUNT bounds the run, not a time)

Each repetition runs every workload against both targets back to back, the
order alternating between repetitions; the table shows the medians and the
ratio lunseal/tgt.  State tracking is on for lunseal's LUN (a hold with a
change map) unless ``--no-tracking``, as on a backed-up array.

    .venv/bin/python bench/iscsi.py [--duration 10] [--reps 5] [--size 1G] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.support.iscsi import Tgtd, lunseal_url

from lunseal.units import parse_size

LUN_NAME = "bench"
START_TIMEOUT = 30.0
MiB = 1 << 20


@dataclass(frozen=True)
class Sample:
    iops: float
    bw_bytes: float


@dataclass
class Target:
    name: str
    url: str
    stop: Callable[[], None]
    info: dict[str, Any]


# -- processes -------------------------------------------------------------------------


def lunseal_binary() -> str:
    beside = Path(sys.executable).with_name("lunseal")
    found = str(beside) if beside.exists() else shutil.which("lunseal")
    if found is None:
        raise SystemExit("lunseal not found: run with the project's .venv/bin/python")
    return found


def lunseal_cli(home: Path, *args: str) -> Any:
    cmd = [lunseal_binary(), "--home", str(home), "--json", *args]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout
    return json.loads(out) if out.strip() else None


def make_image(path: Path, size: int) -> Path:
    """``size`` random bytes: the content both targets' LUNs start with."""
    with path.open("wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
        f.write(os.urandom(size % MiB))
    return path


def start_lunseal(workdir: Path, image: Path, size: int, tracking: bool) -> Target:
    home = workdir / "lunseal"
    home.mkdir()
    cmd = [lunseal_binary(), "--home", str(home), "serve", "--nbd-port", "0", "--api-port", "0"]
    cmd += ["--iscsi-port", "0", "--no-demo", "--log-level", "warning"]
    with (workdir / "lunseal.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)

    def stop() -> None:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    try:
        info_file = home / "daemon.json"
        deadline = time.monotonic() + START_TIMEOUT
        while not info_file.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"lunseal did not start (see {workdir / 'lunseal.log'})")
            time.sleep(0.05)
        daemon = json.loads(info_file.read_text())
        lun = lunseal_cli(home, "lun", "create", LUN_NAME, str(size))
        if tracking:
            lunseal_cli(home, "state", "enable", LUN_NAME, "--hold", "bench", "--track-changes")
        nbd = f"nbd+unix:///{LUN_NAME}?socket={daemon['nbd_unix']}"
        subprocess.run(
            ["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(image), nbd],
            capture_output=True,
            timeout=600,
            check=True,
        )
    except BaseException:
        stop()
        raise
    url = lunseal_url(daemon, int(lun["number"]))
    return Target("lunseal", url, stop, {"path": lun["path"], "tracking": tracking})


def start_tgt(workdir: Path, image: Path) -> Target:
    backing = workdir / "tgt-lu.img"
    shutil.copyfile(image, backing)
    tgtd = Tgtd(workdir / "tgt").start()
    try:
        url = tgtd.add_lun(1, backing)
    except BaseException:
        tgtd.stop()
        raise
    return Target("tgt", url, tgtd.stop, {"path": str(backing), "port": tgtd.port})


@contextmanager
def targets(workdir: Path, size: int, tracking: bool, names: list[str]) -> Iterator[list[Target]]:
    image = make_image(workdir / "image.raw", size)
    with ExitStack() as stack:
        started = []
        for name in names:
            if name == "lunseal":
                target = start_lunseal(workdir, image, size, tracking)
            else:
                target = start_tgt(workdir, image)
            stack.callback(target.stop)
            started.append(target)
        image.unlink()
        os.sync()  # write back the fill now, not during the measurements
        try:
            yield started
        except BaseException:
            log = workdir / "lunseal.log"
            if log.exists():
                print(f"--- lunseal log ---\n{log.read_text()[-8000:]}", file=sys.stderr)
            raise


# -- workloads -------------------------------------------------------------------------

_PERF_AVERAGE = re.compile(r"^iops average (\d+)", re.MULTILINE)
_BENCH_DONE = re.compile(r"Run completed in ([\d.]+) seconds")


def iscsi_perf(url: str, blocks: int, depth: int, random: bool, duration: int) -> Sample:
    cmd = ["iscsi-perf", "-m", str(depth), "-b", str(blocks), "-t", str(duration)]
    cmd += ["-r"] if random else []
    proc = subprocess.run(
        [*cmd, url], capture_output=True, text=True, timeout=duration + 60, check=False
    )
    found = _PERF_AVERAGE.findall(proc.stdout)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    iops = float(found[-1])  # the last line is the whole run's average
    return Sample(iops, iops * blocks * 512)


def qemu_bench_write(url: str, count: int, depth: int, offset: int) -> Sample:
    cmd = ["qemu-img", "bench", "-w", "-f", "raw", "-t", "none", "-s", "4096"]
    cmd += ["-d", str(depth), "-c", str(count), "-o", str(offset), url]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    found = _BENCH_DONE.search(proc.stdout)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
    seconds = float(found.group(1))
    return Sample(count / seconds, count * 4096 / seconds)


WORKLOADS = ["4k-randread-qd32", "1m-seqread-qd8", "4k-write-qd32"]


def measure(target: Target, workload: str, opts: argparse.Namespace, rep: int) -> Sample:
    if workload == "4k-randread-qd32":
        return iscsi_perf(target.url, 8, 32, True, opts.duration)
    if workload == "1m-seqread-qd8":
        return iscsi_perf(target.url, 2048, 8, False, opts.duration)
    # Each repetition writes a different stretch, the same one on both targets.
    span = opts.write_count * 4096
    offset = (rep * span) % max(opts.size - span, 1) // 4096 * 4096
    return qemu_bench_write(target.url, opts.write_count, 32, offset)


# -- reporting -------------------------------------------------------------------------


def medians(samples: list[Sample]) -> Sample:
    return Sample(
        iops=statistics.median(s.iops for s in samples),
        bw_bytes=statistics.median(s.bw_bytes for s in samples),
    )


def summary(results: dict[str, dict[str, list[Sample]]]) -> list[dict[str, Any]]:
    rows = []
    nothing = [Sample(float("nan"), float("nan"))]
    for workload, by_target in results.items():
        lun = medians(by_target.get("lunseal", nothing))
        tgt = medians(by_target.get("tgt", nothing))
        rows.append(
            {
                "workload": workload,
                "lunseal_iops": lun.iops,
                "lunseal_mbps": lun.bw_bytes / 1e6,
                "tgt_iops": tgt.iops,
                "tgt_mbps": tgt.bw_bytes / 1e6,
                "ratio": lun.iops / tgt.iops if tgt.iops else float("nan"),
            }
        )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ("workload", "lunseal IOPS", "lunseal MB/s", "tgt IOPS", "tgt MB/s", "ratio")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * 5) + "|")
    for r in rows:
        cells = [
            r["workload"],
            f"{r['lunseal_iops']:,.0f}",
            f"{r['lunseal_mbps']:,.0f}",
            f"{r['tgt_iops']:,.0f}",
            f"{r['tgt_mbps']:,.0f}",
            f"{r['ratio']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


def tool_version(*cmd: str) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    out = (proc.stdout or proc.stderr).strip()
    return out.splitlines()[0] if out else "?"


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "tgtd": tool_version("tgtadm", "--version"),
        "qemu-img": tool_version("qemu-img", "--version"),
        "lunseal": tool_version(lunseal_binary(), "--version"),
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per iscsi-perf run")
    p.add_argument("--write-count", type=int, default=40000, help="qemu-img bench writes per run")
    p.add_argument("--reps", type=int, default=5, help="repetitions per workload (default 5)")
    p.add_argument("--size", type=parse_size, default="1G", help="LUN size (default 1G)")
    p.add_argument(
        "--workloads", default=",".join(WORKLOADS), help="comma-separated subset of the above"
    )
    p.add_argument("--targets", default="lunseal,tgt", help="which targets to run (default both)")
    p.add_argument("--no-tracking", action="store_true", help="no hold on lunseal's LUN")
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    opts = p.parse_args(argv)
    unknown = set(opts.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    if not set(opts.targets.split(",")) <= {"lunseal", "tgt"}:
        p.error("--targets takes lunseal, tgt or both")
    if opts.write_count * 4096 > opts.size:
        p.error("--write-count writes more than the LUN holds")
    return opts


def benchmark(pair: list[Target], opts: argparse.Namespace) -> dict[str, dict[str, list[Sample]]]:
    workloads = opts.workloads.split(",")
    results: dict[str, dict[str, list[Sample]]] = {w: {t.name: [] for t in pair} for w in workloads}
    for rep in range(opts.reps):
        order = pair if rep % 2 == 0 else pair[::-1]
        for w in workloads:
            for target in order:
                sample = measure(target, w, opts, rep)
                results[w][target.name].append(sample)
                print(
                    f"rep {rep + 1}/{opts.reps} {w:<17} {target.name:<8}"
                    f" {sample.iops:>10,.0f} IOPS {sample.bw_bytes / 1e6:>8,.0f} MB/s",
                    flush=True,
                )
    return results


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lunseal-iscsi-bench-", dir=opts.workdir) as tmp:
        names = opts.targets.split(",")
        with targets(Path(tmp), opts.size, not opts.no_tracking, names) as pair:
            results = benchmark(pair, opts)
    report: dict[str, Any] = {
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(opts).items()},
        "samples": {
            w: {t: [vars(x) for x in xs] for t, xs in by.items()} for w, by in results.items()
        },
        "summary": summary(results),
    }
    print()
    print_table(report["summary"])
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
