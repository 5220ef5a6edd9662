"""Benchmark lunseal against nbdkit's file plugin with fio's nbd engine.

Both servers export a same-size file over a Unix socket; both files are filled
with data first, so reads are served from the page cache and the comparison is
about the NBD servers, not the disk.  Each workload runs time-based against
each server in turn (the order alternates between repetitions); the table
shows the median IOPS and MB/s (10^6 bytes/s) of each and lunseal/nbdkit.

State tracking is on (a hold with a change map on every LUN) unless
``--no-tracking``: that is how a backed-up array runs.  ``--luns N`` serves N
LUNs (nbdkit: N exports of one file plugin ``dir=``) and runs one fio job per
LUN at once; the table then shows the aggregate of the N jobs.

``--baseline SRC`` also runs a second lunseal, imported from the source tree
``SRC`` (e.g. ``git archive BASE src | tar -x -C /tmp/base`` then
``--baseline /tmp/base/src``), as a third server in the same repetitions:
a before/after comparison that the machine's drift hits equally.

    .venv/bin/python bench/nbd_fio.py [--duration 10] [--reps 5] [--luns 4] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lunseal.units import parse_size

LUN_NAME = "bench"
START_TIMEOUT = 30.0


@dataclass(frozen=True)
class Workload:
    name: str
    rw: str
    bs: str
    iodepth: int

    @property
    def direction(self) -> str:
        return "read" if "read" in self.rw else "write"


WORKLOADS = [
    Workload("4k-randread-qd32", "randread", "4k", 32),
    Workload("4k-randwrite-qd32", "randwrite", "4k", 32),
    Workload("1m-seqread-qd8", "read", "1m", 8),
    Workload("1m-seqwrite-qd8", "write", "1m", 8),
]


@dataclass
class Server:
    name: str
    uri: str
    proc: subprocess.Popen[bytes]
    info: dict[str, Any] = field(default_factory=dict)
    #: One URI per LUN/export (``uri`` is the first).
    uris: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Sample:
    iops: float
    bw_bytes: float


# -- processes -------------------------------------------------------------------------


def lunseal_binary() -> str:
    beside = Path(sys.executable).with_name("lunseal")
    found = str(beside) if beside.exists() else shutil.which("lunseal")
    if found is None:
        raise SystemExit("lunseal not found: run with the project's .venv/bin/python")
    return found


def lunseal_env(source: Path | None) -> dict[str, str] | None:
    """The environment that makes ``lunseal`` import the tree ``source`` (None: ours)."""
    return None if source is None else {**os.environ, "PYTHONPATH": str(source)}


def lunseal_cli(home: Path, *args: str, source: Path | None = None) -> Any:
    cmd = [lunseal_binary(), "--home", str(home), "--json", *args]
    out = subprocess.run(
        cmd, capture_output=True, text=True, timeout=60, check=True, env=lunseal_env(source)
    ).stdout
    return json.loads(out) if out.strip() else None


def wait_for(path: Path, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"{what} did not start (see the logs in {path.parent})")
        time.sleep(0.05)


def lun_names(luns: int) -> list[str]:
    return [LUN_NAME] if luns == 1 else [f"{LUN_NAME}{i}" for i in range(luns)]


def start_lunseal(
    workdir: Path,
    size: int,
    luns: int = 1,
    tracking: bool = False,
    *,
    source: Path | None = None,
    name: str = "lunseal",
) -> Server:
    home = workdir / name
    home.mkdir()
    cmd = [lunseal_binary(), "--home", str(home), "serve", "--nbd-port", "0"]
    cmd += ["--api-port", "0", "--no-demo", "--log-level", "warning"]
    with (workdir / f"{name}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log, env=lunseal_env(source))
    wait_for(home / "daemon.json", proc, name)
    sock = json.loads((home / "daemon.json").read_text())["nbd_unix"]
    uris, paths = [], []
    for lun in lun_names(luns):
        info = lunseal_cli(home, "lun", "create", lun, str(size), source=source)
        if tracking:
            # What a backed-up array runs with: a hold that keeps a change map.
            enable = ["state", "enable", lun, "--hold", "bench", "--track-changes"]
            lunseal_cli(home, *enable, source=source)
        uris.append(f"nbd+unix:///{lun}?socket={sock}")
        paths.append(info["path"])
    info = {"home": str(home), "path": paths[0], "tracking": tracking}
    return Server(name, uris[0], proc, info, uris)


def start_nbdkit(workdir: Path, size: int, threads: int | None, luns: int = 1) -> Server:
    sock = workdir / "nbdkit.sock"
    images = workdir / "nbdkit-exports"
    images.mkdir()
    for name in lun_names(luns):
        with (images / name).open("wb") as f:
            f.truncate(size)
    cmd = ["nbdkit", "--foreground", "--exit-with-parent", "--unix", str(sock)]
    cmd += ["--threads", str(threads)] if threads else []
    cmd += ["file", f"dir={images}"]  # one export per file, named like it
    with (workdir / "nbdkit.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    wait_for(sock, proc, "nbdkit")
    uris = [f"nbd+unix:///{name}?socket={sock}" for name in lun_names(luns)]
    return Server("nbdkit", uris[0], proc, {"path": str(images / LUN_NAME)}, uris)


def stop(server: Server) -> None:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(30)
        except subprocess.TimeoutExpired:
            server.proc.kill()
            server.proc.wait()


@contextmanager
def lunseal_running(workdir: Path, size: int, tracking: bool = False) -> Iterator[Server]:
    """A lunseal daemon for a benchmark; its log's tail is printed if the run fails."""
    server = start_lunseal(workdir, size, tracking=tracking)
    try:
        yield server
    except BaseException:
        log = workdir / "lunseal.log"
        if log.exists():
            print(f"--- daemon log ({log}) ---\n{log.read_text()[-8000:]}", file=sys.stderr)
        raise
    finally:
        stop(server)


@contextmanager
def servers(
    workdir: Path,
    size: int,
    threads: int | None,
    luns: int = 1,
    tracking: bool = True,
    baseline: Path | None = None,
) -> Iterator[list[Server]]:
    """lunseal, nbdkit and (with ``baseline``) lunseal from another source tree."""
    with ExitStack() as stack:
        lunseal = start_lunseal(workdir, size, luns, tracking)
        stack.callback(stop, lunseal)
        nbdkit = start_nbdkit(workdir, size, threads, luns)
        stack.callback(stop, nbdkit)
        started = [lunseal, nbdkit]
        if baseline is not None:
            base = start_lunseal(workdir, size, luns, tracking, source=baseline, name="base")
            stack.callback(stop, base)
            started.append(base)
        yield started


# -- fio -------------------------------------------------------------------------------


def fio_args(uri: str | list[str], output: Path, *options: str) -> list[str]:
    """fio with the shared ``options`` and one job per URI (all run at once,
    reported as one group)."""
    uris = [uri] if isinstance(uri, str) else uri
    jobs = []
    for i, u in enumerate(uris):
        jobs += [f"--name=bench{i}", f"--uri={u}"]
    group = ["--group_reporting"] if len(uris) > 1 else []
    return [
        "fio",
        "--ioengine=nbd",
        "--output-format=json",
        f"--output={output}",
        *group,
        *options,
        *jobs,
    ]


def run_fio(args: list[str], cwd: Path, timeout: float) -> dict[str, Any]:
    """Run fio; return its single (group-reported) job record."""
    subprocess.run(args, cwd=cwd, capture_output=True, timeout=timeout, check=True)
    output = next(a.split("=", 1)[1] for a in args if a.startswith("--output="))
    job: dict[str, Any] = json.loads(Path(output).read_text())["jobs"][0]
    if job["error"]:
        raise SystemExit(f"fio reported error {job['error']}: {' '.join(args)}")
    return job


def precondition(server: Server, size: int, workdir: Path) -> None:
    """Write every byte once (1 MiB sequential), so no read hits a hole."""
    out = workdir / f"fill-{server.name}.json"
    options = ["--rw=write", "--bs=1m", "--iodepth=8", f"--size={size}"]
    uris = server.uris or [server.uri]
    job = run_fio(fio_args(uris, out, *options), workdir, timeout=600)
    if job["write"]["io_bytes"] != size * len(uris):
        raise SystemExit(f"preconditioning {server.name} wrote {job['write']['io_bytes']} bytes")


def measure(server: Server, w: Workload, opts: argparse.Namespace, workdir: Path) -> Sample:
    out = workdir / f"{w.name}-{server.name}.json"
    options = [
        f"--rw={w.rw}",
        f"--bs={w.bs}",
        f"--iodepth={w.iodepth}",
        f"--size={opts.size}",
        "--numjobs=1",
        "--time_based",
        f"--runtime={opts.duration}",
        f"--ramp_time={opts.ramp}",
    ]
    timeout = opts.duration + opts.ramp + 60
    job = run_fio(fio_args(server.uris or [server.uri], out, *options), workdir, timeout)
    stats = job[w.direction]
    return Sample(iops=float(stats["iops"]), bw_bytes=float(stats["bw_bytes"]))


# -- probe: fio jobs vs connections and nbdkit threads ---------------------------------


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def lunseal_connections(server: Server) -> int:
    return int(lunseal_cli(Path(server.info["home"]), "lun", "show", LUN_NAME)["connections"])


def probe(lunseal: Server, nbdkit: Server, workdir: Path, size: int) -> list[dict[str, int]]:
    """Run fio with 1 and 2 jobs; count lunseal connections and nbdkit threads mid-run."""
    rows = []
    for numjobs in (1, 2):
        row = {"numjobs": numjobs}
        for server in (lunseal, nbdkit):
            options = ["--rw=randread", "--bs=4k", "--iodepth=32", f"--numjobs={numjobs}"]
            options += [f"--size={size}", "--time_based", "--runtime=3"]
            args = fio_args(server.uri, workdir / "probe.json", *options)
            fio = subprocess.Popen(args, cwd=workdir, stdout=subprocess.DEVNULL)
            time.sleep(1.5)
            if server is lunseal:
                row["lunseal_connections"] = lunseal_connections(server)
                row["lunseal_threads"] = thread_count(server.proc.pid)
            else:
                row["nbdkit_threads"] = thread_count(server.proc.pid)
            fio.wait(30)
        rows.append(row)
    return rows


# -- reporting -------------------------------------------------------------------------


def medians(samples: list[Sample]) -> Sample:
    return Sample(
        iops=statistics.median(s.iops for s in samples),
        bw_bytes=statistics.median(s.bw_bytes for s in samples),
    )


def summary(results: dict[str, dict[str, list[Sample]]]) -> list[dict[str, Any]]:
    rows = []
    for workload, by_server in results.items():
        lun, kit = medians(by_server["lunseal"]), medians(by_server["nbdkit"])
        row = {
            "workload": workload,
            "lunseal_iops": lun.iops,
            "lunseal_mbps": lun.bw_bytes / 1e6,
            "nbdkit_iops": kit.iops,
            "nbdkit_mbps": kit.bw_bytes / 1e6,
            "ratio": lun.iops / kit.iops if kit.iops else float("nan"),
        }
        if "base" in by_server:
            base = medians(by_server["base"])
            row["base_iops"] = base.iops
            row["base_ratio"] = base.iops / kit.iops if kit.iops else float("nan")
        rows.append(row)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    head = ["workload", "lunseal IOPS", "lunseal MB/s", "nbdkit IOPS", "nbdkit MB/s", "ratio"]
    baseline = bool(rows) and "base_iops" in rows[0]
    if baseline:
        head += ["baseline IOPS", "baseline ratio"]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|")
    for r in rows:
        cells = [
            r["workload"],
            f"{r['lunseal_iops']:,.0f}",
            f"{r['lunseal_mbps']:,.0f}",
            f"{r['nbdkit_iops']:,.0f}",
            f"{r['nbdkit_mbps']:,.0f}",
            f"{r['ratio']:.2f}",
        ]
        if baseline:
            cells += [f"{r['base_iops']:,.0f}", f"{r['base_ratio']:.2f}"]
        print("| " + " | ".join(cells) + " |")


def print_probe(rows: list[dict[str, int]]) -> None:
    for r in rows:
        print(
            f"fio numjobs={r['numjobs']}: lunseal sees {r['lunseal_connections']} connection(s)"
            f" ({r['lunseal_threads']} threads); nbdkit runs {r['nbdkit_threads']} threads"
        )


def tool_version(*cmd: str) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False).stdout
    return out.strip().splitlines()[0] if out.strip() else "?"


def environment() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "fio": tool_version("fio", "--version"),
        "nbdkit": tool_version("nbdkit", "--version"),
        "lunseal": tool_version(lunseal_binary(), "--version"),
    }


# -- main ------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--duration", type=int, default=10, help="seconds per fio run (default 10)")
    p.add_argument("--ramp", type=int, default=2, help="fio ramp_time seconds (default 2)")
    p.add_argument("--reps", type=int, default=5, help="repetitions per workload (default 5)")
    p.add_argument("--size", type=parse_size, default="2G", help="export size (default 2G)")
    p.add_argument(
        "--workloads",
        default=",".join(w.name for w in WORKLOADS),
        help="comma-separated subset of: " + ", ".join(w.name for w in WORKLOADS),
    )
    p.add_argument("--nbdkit-threads", type=int, default=None, help="nbdkit --threads")
    p.add_argument("--no-probe", action="store_true", help="skip the connection/thread probe")
    p.add_argument("--luns", type=int, default=1, help="LUNs/exports, one fio job each")
    p.add_argument(
        "--no-tracking", action="store_true", help="no hold (tracking off) on lunseal's LUNs"
    )
    p.add_argument(
        "--baseline",
        type=Path,
        default=None,
        help="also run lunseal imported from this source tree (its src/) as 'base'",
    )
    p.add_argument("--json", type=Path, default=None, help="also write results here")
    p.add_argument("--workdir", type=Path, default=None, help="parent of the temp directory")
    return p.parse_args(argv)


def selected(names: str) -> list[Workload]:
    by_name = {w.name: w for w in WORKLOADS}
    unknown = [n for n in names.split(",") if n not in by_name]
    if unknown:
        raise SystemExit(f"unknown workload(s): {', '.join(unknown)}")
    return [by_name[n] for n in names.split(",")]


def benchmark(
    pair: list[Server], workloads: list[Workload], opts: argparse.Namespace, workdir: Path
) -> dict[str, dict[str, list[Sample]]]:
    results: dict[str, dict[str, list[Sample]]] = {
        w.name: {s.name: [] for s in pair} for w in workloads
    }
    for rep in range(opts.reps):
        order = pair if rep % 2 == 0 else pair[::-1]
        for w in workloads:
            for server in order:
                sample = measure(server, w, opts, workdir)
                results[w.name][server.name].append(sample)
                print(
                    f"rep {rep + 1}/{opts.reps} {w.name:<18} {server.name:<8}"
                    f" {sample.iops:>10,.0f} IOPS {sample.bw_bytes / 1e6:>8,.0f} MB/s",
                    flush=True,
                )
    return results


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    workloads = selected(opts.workloads)
    tracking = not opts.no_tracking
    with servers(
        workdir, opts.size, opts.nbdkit_threads, opts.luns, tracking, opts.baseline
    ) as pair:
        for server in pair:
            precondition(server, opts.size, workdir)
        os.sync()  # write back the fill now, not during the measurements
        skip_probe = opts.no_probe or opts.luns > 1
        probed = [] if skip_probe else probe(pair[0], pair[1], workdir, opts.size)
        results = benchmark(pair, workloads, opts, workdir)
    return {
        "environment": environment(),
        "settings": {k: str(v) for k, v in vars(opts).items()},
        "probe": probed,
        "samples": {
            w: {s: [vars(x) for x in xs] for s, xs in by.items()} for w, by in results.items()
        },
        "summary": summary(results),
    }


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lunseal-bench-", dir=opts.workdir) as tmp:
        report = run(opts, Path(tmp))
    print()
    print_probe(report["probe"])
    print()
    print_table(report["summary"])
    if opts.json is not None:
        opts.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"\nresults written to {opts.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
