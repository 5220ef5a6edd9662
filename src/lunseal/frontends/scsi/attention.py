"""Unit attention conditions, kept per LUN and initiator port (SAM-5 5.14).

A condition is reported once, with CHECK CONDITION, to the next command of
that initiator port for that LUN (except INQUIRY, REPORT LUNS and REQUEST
SENSE; REQUEST SENSE returns and clears it).  Transports call in from their
event loop, commands run on the LUNs' workers: a lock keeps the tables whole.
"""

from __future__ import annotations

import threading

from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.sense import UNIT_ATTENTION, SenseError

POWER_ON_RESET = (0x29, 0x00)
TARGET_RESET = (0x29, 0x00)
LUN_RESET = (0x29, 0x03)
CAPACITY_CHANGED = (0x2A, 0x09)
#: Queued conditions per (LUN, port) beyond which the oldest are dropped: a
#: host that never sends a command must not grow the table without bound.
MAX_PENDING = 8

Key = tuple[str, str]  # (LUN UUID, initiator port)


class UnitAttentions:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: dict[Key, list[tuple[int, int]]] = {}
        #: The LUN size each port has been told about (capacity-changed detection).
        self._seen_size: dict[Key, int] = {}

    def admit(self, lun: Lun, port: str) -> None:
        """Note a command from ``port`` to ``lun``: a first one raises power on /
        reset, one after the LUN grew raises capacity data has changed."""
        key = (lun.record.uuid, port)
        with self._lock:
            seen = self._seen_size.get(key)
            if seen is None:
                self._seen_size[key] = lun.size
                self._add(key, POWER_ON_RESET)
            elif seen != lun.size:
                self._seen_size[key] = lun.size
                self._add(key, CAPACITY_CHANGED)

    def take(self, lun: Lun, port: str) -> SenseError | None:
        """The oldest pending condition for ``port`` on ``lun``, removed."""
        with self._lock:
            queue = self._pending.get((lun.record.uuid, port))
            if not queue:
                return None
            asc, ascq = queue.pop(0)
        return SenseError("unit attention", UNIT_ATTENTION, asc, ascq)

    def post(
        self, lun_uuid: str, condition: tuple[int, int], *, ports: set[str] | None = None
    ) -> None:
        """Raise ``condition`` for every port that knows the LUN (or those given)."""
        with self._lock:
            for key in list(self._seen_size):
                if key[0] == lun_uuid and (ports is None or key[1] in ports):
                    self._add(key, condition)

    def forget(self, port: str) -> None:
        """The port's nexus ended: a new one starts with power on / reset again."""
        with self._lock:
            for key in [k for k in self._seen_size if k[1] == port]:
                del self._seen_size[key]
                self._pending.pop(key, None)

    def _add(self, key: Key, condition: tuple[int, int]) -> None:
        queue = self._pending.setdefault(key, [])
        if condition not in queue:
            queue.append(condition)
            del queue[:-MAX_PENDING]
