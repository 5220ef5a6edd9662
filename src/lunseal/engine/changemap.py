"""Change maps: which regions of a LUN changed since a hold's token.

One byte per region (0 or 1) rather than one bit: 64 KiB regions make that
16 KiB per GiB of LUN, and marking a range is then a single slice assignment
on the write path instead of a loop over bits.  Stored zlib-compressed.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

from lunseal.errors import InvalidArgument

DEFAULT_GRANULARITY = 64 << 10
MIN_GRANULARITY = 4 << 10
MAX_GRANULARITY = 1 << 30


def validate_granularity(granularity: int) -> int:
    if (
        granularity < MIN_GRANULARITY
        or granularity > MAX_GRANULARITY
        or granularity & (granularity - 1)
    ):
        raise InvalidArgument(
            f"invalid change-map granularity {granularity}: must be a power of two from 4K to 1G"
        )
    return granularity


@dataclass(frozen=True, slots=True)
class ChangedExtent:
    offset: int
    length: int


class ChangeMap:
    def __init__(self, size: int, granularity: int, regions: bytearray | None = None) -> None:
        self.granularity = validate_granularity(granularity)
        self.size = size
        count = self._regions_for(size)
        self.regions = regions if regions is not None else bytearray(count)
        if len(self.regions) < count:
            self.regions.extend(bytes(count - len(self.regions)))

    def _regions_for(self, size: int) -> int:
        return -(-size // self.granularity)

    def mark(self, offset: int, length: int) -> None:
        """Record that ``[offset, offset+length)`` changed (grows with the LUN)."""
        if length <= 0:
            return
        end = offset + length
        if end > self.size:
            self.resize(end)
        first = offset // self.granularity
        last = (end - 1) // self.granularity
        if first == last:
            self.regions[first] = 1
        else:
            self.regions[first : last + 1] = b"\x01" * (last + 1 - first)

    def clear(self, offset: int, length: int) -> None:
        """Forget changes in the regions *wholly* inside the range (partial ones stay)."""
        g = self.granularity
        first = -(-offset // g)
        stop = min((offset + length) // g, len(self.regions))
        if offset + length >= self.size:
            stop = len(self.regions)  # the short last region ends at the LUN's end
        if stop > first:
            self.regions[first:stop] = bytes(stop - first)

    def merge(self, other: ChangeMap) -> None:
        """Add every region ``other`` marks (same granularity)."""
        assert other.granularity == self.granularity
        self.resize(other.size)
        pos = other.regions.find(1)
        while pos != -1:
            stop = other.regions.find(0, pos)
            stop = len(other.regions) if stop == -1 else stop
            self.regions[pos:stop] = b"\x01" * (stop - pos)
            pos = other.regions.find(1, stop)

    def first_run(self, limit: int) -> tuple[int, int] | None:
        """The first changed run as (offset, length), at most ``limit`` bytes (>= 1 region)."""
        pos = self.regions.find(1)
        if pos == -1:
            return None
        stop = self.regions.find(0, pos)
        stop = len(self.regions) if stop == -1 else stop
        stop = min(stop, pos + max(1, limit // self.granularity))
        start = pos * self.granularity
        return start, min(stop * self.granularity, self.size) - start

    def changed_regions(self) -> int:
        return self.regions.count(1)

    def mark_all(self) -> None:
        self.regions[:] = b"\x01" * len(self.regions)

    def resize(self, size: int) -> None:
        count = self._regions_for(size)
        if count > len(self.regions):
            self.regions.extend(bytes(count - len(self.regions)))
        self.size = max(self.size, size)

    def extents(self) -> list[ChangedExtent]:
        """Runs of changed regions, merged, clipped to the LUN size."""
        found: list[ChangedExtent] = []
        g = self.granularity
        regions = self.regions
        pos = regions.find(1)
        while pos != -1:
            stop = regions.find(0, pos)
            if stop == -1:
                stop = len(regions)
            start = pos * g
            found.append(ChangedExtent(start, min(stop * g, self.size) - start))
            pos = regions.find(1, stop)
        return found

    def changed_bytes(self) -> int:
        return sum(ext.length for ext in self.extents())

    def to_blob(self) -> bytes:
        return zlib.compress(bytes(self.regions), 1)

    @classmethod
    def from_blob(cls, size: int, granularity: int, blob: bytes) -> ChangeMap:
        return cls(size, granularity, bytearray(zlib.decompress(blob)))
