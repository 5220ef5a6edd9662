"""What the dispatcher calls in modules other engineers own.

* Reservations (``reservations.py``): a :class:`ReservationStore` decides
  whether a command conflicts with a reservation and runs PERSISTENT RESERVE
  IN/OUT, RESERVE(6) and RELEASE(6).
* The in-band state commands (``state_commands.py``): a module with
  ``execute(lun, cmd) -> ScsiResult`` (and optionally
  ``data_out_length(cdb) -> int``) runs operation codes C0h-FFh.  Until that
  module exists those operation codes are unknown.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lunseal.engine.lun import Lun
from lunseal.frontends.scsi.attention import UnitAttentions
from lunseal.frontends.scsi.interface import Nexus, ScsiCommand, ScsiResult


class ReservationStore(Protocol):
    def conflicts(self, nexus: Nexus, lun: Lun, cdb: bytes) -> bool:
        """Whether ``cdb`` from ``nexus`` conflicts with a reservation on ``lun``
        (the dispatcher then answers RESERVATION CONFLICT without running it)."""
        ...

    def execute(self, lun: Lun, cmd: ScsiCommand, attentions: UnitAttentions) -> ScsiResult:
        """Run PERSISTENT RESERVE IN/OUT, RESERVE(6) or RELEASE(6); may raise
        :class:`~lunseal.frontends.scsi.sense.SenseError`.  A preemption posts
        its unit attentions (2Ah/03h etc.) through ``attentions.post``."""
        ...

    def reset_lun(self, lun: Lun) -> None:
        """LUN RESET / TARGET WARM RESET: RESERVE(6) reservations are released."""
        ...

    def nexus_gone(self, nexus: Nexus) -> None:
        """The I_T nexus ended: its RESERVE(6) reservations are released."""
        ...


@dataclass(frozen=True)
class VendorCommands:
    execute: Callable[[Lun, ScsiCommand], ScsiResult]
    data_out_length: Callable[[bytes], int]


def load_vendor_commands() -> VendorCommands | None:
    """The state commands' module, if it exists yet."""
    try:
        module = importlib.import_module("lunseal.frontends.scsi.state_commands")
    except ModuleNotFoundError as exc:
        if exc.name != "lunseal.frontends.scsi.state_commands":
            raise
        return None
    execute = getattr(module, "execute", None)
    if execute is None:
        return None
    length = getattr(module, "data_out_length", None)
    return VendorCommands(execute, length if length is not None else lambda cdb: 0)
