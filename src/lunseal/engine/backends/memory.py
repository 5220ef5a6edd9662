"""In-memory backend for unit tests and throw-away LUNs.

Storage is a dict of fixed-size pages; a missing page is a hole.  Pages that
become entirely zero through trim/zero are dropped, so extents behave like a
sparse file's.
"""

from __future__ import annotations

from lunseal.engine.backends.base import Backend, Extent, merge_extents

PAGE = 4096


class MemoryBackend(Backend):
    kind = "memory"

    def __init__(self, size: int) -> None:
        self._size = size
        self._pages: dict[int, bytearray] = {}

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        pos = offset
        end = offset + length
        while pos < end:
            index, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            page = self._pages.get(index)
            if page is not None:
                out[pos - offset : pos - offset + n] = page[within : within + n]
            pos += n
        return bytes(out)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        pos = offset
        done = 0
        while done < len(view):
            index, within = divmod(pos, PAGE)
            n = min(PAGE - within, len(view) - done)
            page = self._pages.setdefault(index, bytearray(PAGE))
            page[within : within + n] = view[done : done + n]
            pos += n
            done += n

    def flush(self) -> None:
        """Memory is as durable as it gets; nothing to do."""

    def trim(self, offset: int, length: int) -> None:
        self._clear(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        # Dropping pages is both the fast path and correct for either may_trim value:
        # allocation status is not observable beyond extents, which may report holes.
        self._clear(offset, length)

    def _clear(self, offset: int, length: int) -> None:
        pos = offset
        end = offset + length
        while pos < end:
            index, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            page = self._pages.get(index)
            if page is not None:
                if n == PAGE:
                    del self._pages[index]
                else:
                    page[within : within + n] = bytes(n)
                    if not any(page):
                        del self._pages[index]
            pos += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._size)
        found: list[Extent] = []
        pos = offset
        while pos < end:
            index, within = divmod(pos, PAGE)
            n = min(PAGE - within, end - pos)
            hole = index not in self._pages
            found.append(Extent(pos, n, hole=hole, zero=hole))
            pos += n
        return merge_extents(found)

    def resize(self, size: int) -> None:
        if size < self._size:
            self._clear(size, self._size - size)
        self._size = size

    def close(self) -> None:
        self._pages.clear()
