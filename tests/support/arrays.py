"""In-process arrays on one data directory: clean restarts and simulated crashes."""

from __future__ import annotations

import os
from pathlib import Path

from lunseal.engine.array import Array
from lunseal.engine.backends.layers import FaultyBackend


def abandon(array: Array) -> None:
    """Leave ``array`` as ``kill -9`` would: close its descriptors and the database
    connection without flushing, checkpointing or recording a clean shutdown."""
    for lun in array.luns():
        lun._backend.close()
    array.catalog.close()
    os.close(array._lock_fd)


class Arrays:
    """Opens arrays on one data directory and closes whatever a test left open."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.current: Array | None = None

    def open(self) -> Array:
        assert self.current is None
        self.current = Array.open(self.data_dir)
        return self.current

    def restart(self) -> Array:
        """Clean shutdown and start-up."""
        assert self.current is not None
        self.current.close()
        self.current = None
        return self.open()

    def crash(self) -> Array:
        """kill -9, then start-up."""
        assert self.current is not None
        abandon(self.current)
        self.current = None
        array = self.open()
        assert not array.last_shutdown_clean
        return array

    def close(self) -> None:
        if self.current is None:
            return
        for lun in self.current.luns():  # a test may leave a fault injected
            for layer in (lun._backend, getattr(lun._backend, "inner", None)):
                if isinstance(layer, FaultyBackend):
                    layer.fail_writes = False
        self.current.close()
        self.current = None
