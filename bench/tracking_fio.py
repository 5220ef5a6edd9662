"""Cost of state tracking on the write path: fio 4k random writes, QD32, against
one lunseal LUN with tracking off, on (counter mode) and on with a 64 KiB
change map, in the same run.  Prints medians and the on/off ratios.

    .venv/bin/python bench/tracking_fio.py [--duration 10] [--reps 5] [--size 2G]

Target (issue "LUN state tokens"): ratio >= 0.97 for both tracking settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from nbd_fio import (
    Sample,
    Workload,
    lunseal_cli,
    measure,
    parse_size,
    precondition,
    start_lunseal,
    stop,
)

WORKLOAD = Workload("4k-randwrite-qd32", "randwrite", "4k", 32)
LUN = "bench"
#: name -> `state enable` arguments (None: tracking off)
SETTINGS: dict[str, list[str] | None] = {
    "off": None,
    "counter": ["--mode", "counter"],
    "counter+map": ["--mode", "counter", "--track-changes=64K"],
}


def apply(home: Path, setting: list[str] | None) -> None:
    holds = lunseal_cli(home, "state", "holds", LUN)
    for hold in holds:
        lunseal_cli(home, "state", "disable", LUN, "--hold", hold["name"])
    if setting is not None:
        lunseal_cli(home, "state", "enable", LUN, "--hold", "bench", *setting)


def run(opts: argparse.Namespace, workdir: Path) -> dict[str, list[Sample]]:
    server = start_lunseal(workdir, opts.size)
    home = Path(server.info["home"])
    samples: dict[str, list[Sample]] = {name: [] for name in SETTINGS}
    try:
        precondition(server, opts.size, workdir)
        names = list(SETTINGS)
        for rep in range(opts.reps):
            # Rotate the order so slow drifts of a shared machine hit every setting.
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                apply(home, SETTINGS[name])
                samples[name].append(measure(server, WORKLOAD, opts, workdir))
                print(f"rep {rep + 1} {name:12} {samples[name][-1].iops:>10,.0f} IOPS", flush=True)
    finally:
        stop(server)
    return samples


def report(samples: dict[str, list[Sample]]) -> list[dict[str, float | str]]:
    base = statistics.median(s.iops for s in samples["off"])
    rows: list[dict[str, float | str]] = []
    print(f"\n{'tracking':14}{'median IOPS':>14}{'ratio to off':>14}")
    for name, got in samples.items():
        med = statistics.median(s.iops for s in got)
        rows.append({"setting": name, "median_iops": med, "ratio": med / base})
        print(f"{name:14}{med:>14,.0f}{med / base:>14.3f}")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--ramp", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--size", type=parse_size, default=parse_size("2G"))
    p.add_argument("--json", type=Path, help="also write the samples here")
    opts = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lunseal-tracking-") as tmp:
        samples = run(opts, Path(tmp))
    rows = report(samples)
    if opts.json:
        raw = {k: [s.__dict__ for s in v] for k, v in samples.items()}
        opts.json.write_text(json.dumps({"rows": rows, "samples": raw}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
