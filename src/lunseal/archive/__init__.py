"""The archive ("tape") tier: deduplicated, verifiable backups of LUN images.

See :mod:`lunseal.archive.repository` for the layout and
:mod:`lunseal.archive.storage` for where the objects live.
"""

from lunseal.archive.repository import (
    DEFAULT_CHUNK_SIZE,
    BackupWriter,
    CheckReport,
    ChunkProblem,
    Manifest,
    PruneReport,
    Repository,
    WriteStats,
)
from lunseal.archive.storage import LocalStorage, Storage

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
