"""The archive ("tape") tier: deduplicated, verifiable backups of LUN images.

See :mod:`lunseal.host.archive.repository` for the layout and
:mod:`lunseal.host.archive.storage` for where the objects live.
"""

from lunseal.host.archive.repository import (
    DEFAULT_CHUNK_SIZE,
    BackupWriter,
    CheckReport,
    ChunkProblem,
    Manifest,
    PruneReport,
    Repository,
    WriteStats,
)
from lunseal.host.archive.storage import LocalStorage, Storage

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "BackupWriter",
    "CheckReport",
    "ChunkProblem",
    "LocalStorage",
    "Manifest",
    "PruneReport",
    "Repository",
    "Storage",
    "WriteStats",
]
