"""The backend interface: where a LUN's bytes live.

A backend stores bytes and nothing else.  It trusts its caller: range checks,
read-only checks and state tracking happen once, in :class:`lunseal.engine.lun.Lun`,
before any backend call.  Backends are used from a single thread (the daemon's
event loop), so they need no locks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Extent:
    """A run of bytes with uniform allocation status.

    ``hole``: no storage is allocated.  ``zero``: the range reads as zeroes.
    A hole always reads as zeroes; allocated zeroes (``zero`` without ``hole``)
    are allowed but backends need not detect them.
    """

    offset: int
    length: int
    hole: bool
    zero: bool

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class FileStamp:
    """What identifies a backing file's content from outside (C5): if any field
    differs from what was recorded, someone changed the file."""

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    def differences(self, other: FileStamp) -> list[str]:
        return [
            f"{name} {getattr(self, name)} -> {getattr(other, name)}"
            for name in ("size", "mtime_ns", "ctime_ns", "inode")
            if getattr(self, name) != getattr(other, name)
        ]


@dataclass(frozen=True, slots=True)
class FileSlice:
    """A range of an open file that a front end may send without copying it
    through user space (``sendfile``).  Reading past the file's end yields zeroes."""

    fd: int
    offset: int
    length: int


class Backend(ABC):
    """Byte storage of a fixed (but growable) size."""

    #: Short name stored in the catalog (``file``, ``memory``).
    kind: str = ""

    @property
    @abstractmethod
    def size(self) -> int: ...

    @abstractmethod
    def read(self, offset: int, length: int) -> bytes:
        """Return exactly ``length`` bytes; never-written ranges read as zeroes."""

    @abstractmethod
    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None: ...

    @abstractmethod
    def flush(self) -> None:
        """Make every completed write durable."""

    @abstractmethod
    def trim(self, offset: int, length: int) -> None:
        """Release storage; the range may read as anything afterwards (here: zeroes)."""

    @abstractmethod
    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        """Make the range read as zeroes.

        ``may_trim``: storage may be released (a hole).  ``fast_only``: raise
        :class:`lunseal.errors.NotSupported` instead of writing zeroes slowly.
        """

    @abstractmethod
    def extents(self, offset: int, length: int) -> list[Extent]:
        """Cover at least ``[offset, offset+length)``, merged, in order, clipped to size."""

    def read_slice(self, offset: int, length: int) -> bytes | FileSlice:
        """Like :meth:`read`, but a file-based backend may return a zero-copy slice."""
        return self.read(offset, length)

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        """The data if it can be had without waiting for a disk (from the page
        cache), else ``None``: the caller then reads it where waiting is fine."""
        return None

    def stamp(self) -> FileStamp | None:
        """The backing file's stamp, or ``None`` where there is no file to tamper with."""
        return None

    def cache(self, offset: int, length: int) -> None:  # noqa: B027 - optional hook
        """Advisory: prefetch the range.  Backends without a cache ignore it."""

    @abstractmethod
    def resize(self, size: int) -> None: ...

    @abstractmethod
    def close(self) -> None: ...


def merge_extents(extents: list[Extent]) -> list[Extent]:
    """Join neighbouring extents with the same flags (backends report them piecemeal)."""
    merged: list[Extent] = []
    for ext in extents:
        if ext.length == 0:
            continue
        last = merged[-1] if merged else None
        if last and last.end == ext.offset and (last.hole, last.zero) == (ext.hole, ext.zero):
            merged[-1] = Extent(last.offset, last.length + ext.length, ext.hole, ext.zero)
        else:
            merged.append(ext)
    return merged
