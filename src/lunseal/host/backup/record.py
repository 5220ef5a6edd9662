"""What a backup made by ``lunseal backup`` records about itself.

The archive stores it as the manifest's metadata (plain JSON, so the archive
stays a generic chunk store); backup and restore read and write it only
through :class:`BackupRecord`, so a missing or mistyped field is one clear
error instead of a ``KeyError`` half-way through a restore.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import StrEnum

from lunseal.errors import ArchiveCorrupt
from lunseal.host.archive import Manifest


class BackupMode(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


@dataclass(frozen=True)
class BackupRecord:
    source: str  # the LUN backed up
    source_uuid: str
    mirror: str  # the mirror whose split target was read
    target: str  # that target LUN: the disk copy
    target_uuid: str
    token: str  # the target's state token when it was read
    hold: str  # the hold keeping the target's change map for the next backup
    parent: str | None  # the backup this one builds on
    mode: BackupMode
    reason: str  # why full or incremental
    bytes_read: int = 0

    def to_meta(self) -> dict[str, object]:
        return {**asdict(self), "mode": self.mode.value}

    @classmethod
    def of(cls, manifest: Manifest) -> BackupRecord:
        """The record of ``manifest``; :class:`ArchiveCorrupt` if it has none."""
        meta = manifest.meta
        try:
            required = {k: meta[k] for k in ("source", "mirror", "target", "token")}
            optional = {
                k: meta.get(k, "") for k in ("source_uuid", "target_uuid", "hold", "reason")
            }
            texts = {**required, **optional}
            if not all(isinstance(v, str) for v in texts.values()):
                raise TypeError("a text field is not text")
            parent, bytes_read = meta.get("parent"), meta.get("bytes_read", 0)
            if not (parent is None or isinstance(parent, str)) or type(bytes_read) is not int:
                raise TypeError("parent or bytes_read has the wrong type")
            mode = BackupMode(meta.get("mode", BackupMode.FULL))
        except (KeyError, TypeError, ValueError) as exc:
            raise ArchiveCorrupt(
                f"backup {manifest.id} has no usable backup record ({type(exc).__name__}: "
                f"{exc}); it was not written by lunseal backup"
            ) from None
        return cls(**texts, parent=parent, mode=mode, bytes_read=bytes_read)
