"""What the dispatcher calls in modules other engineers own.

* Reservations (``reservations.py``): a :class:`ReservationStore` decides
  whether a command conflicts with a reservation and runs PERSISTENT RESERVE
  IN/OUT, RESERVE(6) and RELEASE(6).
* The in-band state commands (``state_commands.py``) run operation codes
  C0h-FFh; :class:`VendorCommands` is the seam, so a test can put other
  vendor commands in their place.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from lunseal.engine.lun import Lun
from lunseal.frontends.scsi import state_commands
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
    #: The I_T nexus ended (initiator port, target port): drop what it kept.
    nexus_gone: Callable[[str, str], None]


def state_vendor_commands(audit: state_commands.AuditHook | None = None) -> VendorCommands:
    """The seed's state commands, as the array's vendor-specific commands; each
    one is passed to ``audit`` (the array's audit trail)."""
    return VendorCommands(
        functools.partial(state_commands.execute, audit=audit),
        state_commands.data_out_length,
        state_commands.nexus_gone,
    )
