"""CPU cost of the write path on a LUN's worker, in-process: no sockets, no
threads, no client sharing the CPU, so the figure moves little with the load of
the machine (unlike bench/nbd_fio.py).

A file-backed LUN in a fresh data directory, tracking on (a hold with a 64 KiB
change map) unless ``--no-tracking``; 4 KiB writes at random offsets, run the
way the NBD server runs them: ``Transmission.execute_batch`` on batches of
``--batch`` requests.  Prints microseconds per write (median of ``--reps``);
``--profile`` adds a cProfile listing of one more round.  To compare with an
older tree, run it with ``PYTHONPATH=OLD/src``.

    .venv/bin/python bench/write_path.py [--writes 40000] [--batch 32] [--reps 5]
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from lunseal.engine.array import Array
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.codec import Request
from lunseal.frontends.nbd.transmission import Buffers, Transmission

LUN_SIZE = 256 << 20
BLOCK = 4096


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--writes", type=int, default=40000, help="writes per round (default 40000)")
    p.add_argument("--batch", type=int, default=32, help="requests per batch (default 32)")
    p.add_argument("--reps", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--no-tracking", action="store_true", help="no hold on the LUN")
    p.add_argument("--profile", action="store_true", help="print a cProfile listing")
    return p.parse_args(argv)


def batches(opts: argparse.Namespace) -> list[list[Request]]:
    payload = memoryview(os.urandom(BLOCK))
    rnd = random.Random(1)
    blocks = LUN_SIZE // BLOCK
    reqs = [
        Request(0, c.CMD_WRITE, i, rnd.randrange(blocks) * BLOCK, BLOCK, payload)
        for i in range(opts.writes)
    ]
    return [reqs[i : i + opts.batch] for i in range(0, len(reqs), opts.batch)]


def run_round(transmission: Transmission, work: list[list[Request]]) -> None:
    # Trees before batches existed (``--baseline``-style comparisons run this
    # script against them with PYTHONPATH) ran a batch request by request.
    execute_batch = getattr(transmission, "execute_batch", None)
    for batch in work:
        out: Buffers = []
        if execute_batch is not None:
            execute_batch(batch, out)
        else:
            for req in batch:
                transmission.execute(req, out)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="lunseal-write-path-") as tmp:
        array = Array.open(Path(tmp) / "home")
        try:
            lun = array.create_lun("bench", LUN_SIZE)
            if not opts.no_tracking:
                array.tracker("bench").acquire("bench", granularity=64 << 10)
            # The calls run on this thread, as they would on the LUN's worker.
            if lun.worker is not None:
                lun.worker.stop()
                lun.worker = None
            transmission = Transmission(lun, structured=True, base_allocation=True)
            work = batches(opts)
            run_round(transmission, work)  # allocate the file's blocks, warm up
            rounds = []
            for _ in range(opts.reps):
                started = time.perf_counter()
                run_round(transmission, work)
                rounds.append((time.perf_counter() - started) / opts.writes * 1e6)
            tracking = "off" if opts.no_tracking else "on (64 KiB change map)"
            print(
                f"{statistics.median(rounds):.2f} us per 4 KiB write on the worker "
                f"(median of {opts.reps}; batches of {opts.batch}; tracking {tracking})"
            )
            if opts.profile:
                profile = cProfile.Profile()
                profile.enable()
                run_round(transmission, work)
                profile.disable()
                pstats.Stats(profile).sort_stats("tottime").print_stats(15)
        finally:
            array.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
