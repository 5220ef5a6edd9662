"""Mirror copy steps run on the source LUN's worker, in order with its host
writes: a copy that read the source could otherwise land on the target after
a newer host write fanned out to the same region."""

from __future__ import annotations

import threading
from pathlib import Path

from lunseal.engine.array import Array

MiB = 1 << 20


def test_a_copy_step_waits_for_the_sources_queued_work(tmp_path: Path) -> None:
    array = Array.open(tmp_path / "home")
    try:
        source, target = array.create_lun("s", 4 * MiB), array.create_lun("t", 4 * MiB)
        source.write(0, b"data before the mirror")
        array.mirrors.create(source, target)
        assert array.mirrors.busy()
        assert source.worker is not None
        gate, ran_on = threading.Event(), []
        source.worker.post(lambda: gate.wait(60))  # the source is busy (a slow write)
        done = threading.Event()

        def step() -> None:
            ran_on.append(array.mirrors.copy_step())
            done.set()

        threading.Thread(target=step).start()
        assert not done.wait(0.5), "the copy step ran beside the source's queued work"
        gate.set()
        assert done.wait(30)
        assert ran_on[0] > 0
        while array.mirrors.busy():
            array.mirrors.copy_step()
        assert target.backend.read(0, 22) == b"data before the mirror"
    finally:
        array.close()
