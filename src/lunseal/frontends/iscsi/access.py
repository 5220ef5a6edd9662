"""Who may log in to the target, with which secrets, and which LUNs they see.

The iSCSI front end asks an :class:`AccessPolicy` at every login.  With no ACL
configured any initiator may log in and sees every LUN (as over NBD).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from lunseal.frontends.scsi.interface import LunAccess


@dataclass(frozen=True)
class ChapSecret:
    user: str
    secret: str


@dataclass(frozen=True)
class InitiatorAccess:
    """What one initiator is allowed: the CHAP it must pass, the LUNs it sees."""

    #: The initiator must authenticate with this (one-way CHAP); ``None``: no CHAP.
    chap: ChapSecret | None = None
    #: The target proves itself with this (mutual CHAP); ``None``: not offered.
    mutual: ChapSecret | None = None
    luns: LunAccess = field(default_factory=LunAccess)


class AccessPolicy(Protocol):
    def login(self, initiator_name: str) -> InitiatorAccess | None:
        """The initiator's access, or ``None`` if it may not log in at all."""
        ...


class OpenAccess:
    """No ACL configured: anyone may log in, without CHAP, and see every LUN."""

    def login(self, initiator_name: str) -> InitiatorAccess | None:
        return InitiatorAccess()
