"""The access policy of the iSCSI target, from the catalog's initiator ACL.

With no initiator configured anyone may log in and sees every LUN (as over
NBD); once one is configured, only configured initiators may log in, each
with its CHAP secrets and LUN masking (see :mod:`lunseal.engine.iscsi_acl`).
The answer is taken at login: a session keeps the access it logged in with,
so after any change to the ACL the server asks again for every session and
ends those whose answer differs (``IscsiServer.access_changed``, hooked to
``IscsiAclStore.on_change`` by the daemon).
"""

from __future__ import annotations

from lunseal.engine.array import Array
from lunseal.engine.iscsi_acl import Chap, InitiatorRecord
from lunseal.frontends.iscsi.access import ChapSecret, InitiatorAccess
from lunseal.frontends.scsi.interface import LunAccess


class CatalogAccess:
    """:class:`~lunseal.frontends.iscsi.access.AccessPolicy` over the array's catalog."""

    def __init__(self, array: Array) -> None:
        self.array = array

    @property
    def configured(self) -> bool:
        """False: anyone may log in (the daemon warns if the portal is not loopback)."""
        return self.array.catalog.iscsi_acl.configured

    def login(self, initiator_name: str) -> InitiatorAccess | None:
        store = self.array.catalog.iscsi_acl
        if not store.configured:
            return InitiatorAccess()
        rec = store.get(initiator_name)
        if rec is None:
            return None
        return InitiatorAccess(
            chap=_secret(rec.chap), mutual=_secret(rec.mutual), luns=self.lun_access(rec)
        )

    def lun_access(self, rec: InitiatorRecord) -> LunAccess:
        """LUN numbers now; a LUN renumbered or created later shows at the next login."""
        numbers = {lun.record.uuid: lun.record.number for lun in self.array.luns()}
        read_only = frozenset(numbers[u] for u, ro in rec.luns.items() if ro and u in numbers)
        if rec.all_luns:
            return LunAccess(visible=None, read_only=read_only)
        visible = frozenset(numbers[u] for u in rec.luns if u in numbers)
        return LunAccess(visible=visible, read_only=read_only)


def _secret(chap: Chap | None) -> ChapSecret | None:
    return None if chap is None else ChapSecret(chap.user, chap.secret)
