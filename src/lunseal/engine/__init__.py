"""The storage engine: LUNs, backends and the catalog. Knows nothing about sockets."""

from lunseal.engine.array import Array
from lunseal.engine.backends.base import Backend, Extent
from lunseal.engine.lun import Lun, LunRecord

__all__ = ["Array", "Backend", "Extent", "Lun", "LunRecord"]
