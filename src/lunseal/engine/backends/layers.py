"""Backend layers: a backend wrapped by another that passes through what it
does not change (nbdkit's filters).  The source LUN of a mirror gets a
:class:`MirroredBackend`; tests use :class:`FaultyBackend` to make a leg fail.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from lunseal.engine.backends.base import Backend, Extent, FileSlice, FileStamp
from lunseal.engine.mirror.mirror import FAN_OUT, Mirror
from lunseal.errors import BackendError, Conflict


class Layer(Backend):
    """Passes everything through to ``inner``."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.kind = inner.kind

    @property
    def size(self) -> int:
        return self.inner.size

    def read(self, offset: int, length: int) -> bytes:
        return self.inner.read(offset, length)

    def read_slice(self, offset: int, length: int) -> bytes | FileSlice:
        return self.inner.read_slice(offset, length)

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        return self.inner.read_cached(offset, length)

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.inner.write(offset, data)

    def flush(self) -> None:
        self.inner.flush()

    def trim(self, offset: int, length: int) -> None:
        self.inner.trim(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self.inner.zero(offset, length, may_trim=may_trim, fast_only=fast_only)

    def extents(self, offset: int, length: int) -> list[Extent]:
        return self.inner.extents(offset, length)

    def stamp(self) -> FileStamp | None:
        return self.inner.stamp()

    def cache(self, offset: int, length: int) -> None:
        self.inner.cache(offset, length)

    def resize(self, size: int) -> None:
        self.inner.resize(size)

    def close(self) -> None:
        self.inner.close()


class MirroredBackend(Layer):
    """Fans the source's changes out to its mirrors, marking regions first."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.mirrors: list[Mirror] = []

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._before(offset, len(data))
        self._on_source(lambda: self.inner.write(offset, data), offset, len(data))
        for m in self.mirrors:
            m.replicate_write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self._before(offset, length)
        self._on_source(lambda: self.inner.trim(offset, length), offset, length)
        for m in self.mirrors:
            m.replicate_zero(offset, length)  # the source now reads zeroes there

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self._before(offset, length)
        zero = self.inner.zero
        self._on_source(
            lambda: zero(offset, length, may_trim=may_trim, fast_only=fast_only), offset, length
        )
        for m in self.mirrors:
            m.replicate_zero(offset, length)

    def _before(self, offset: int, length: int) -> None:
        for m in self.mirrors:
            m.before_source_change(offset, length)

    def _on_source(self, op: Callable[[], None], offset: int, length: int) -> None:
        """Run a source operation; a failure reaches the host as is.

        The source may have changed partly, so the sides may now differ where
        nobody can tell: the mirror degrades (keeping the region marked) and a
        resync makes them equal again.
        """
        try:
            op()
        except BackendError as exc:
            for m in self.mirrors:
                if m.state in FAN_OUT:
                    m.degrade(f"source write {offset}+{length} failed: {exc.message}")
            raise

    def flush(self) -> None:
        self.inner.flush()
        for m in self.mirrors:
            m.replicate_flush()

    def flush_own(self) -> None:
        """Flush the source only (a mirror's checkpoint flushes its own leg)."""
        self.inner.flush()

    def log_intents(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Log the intent regions of a batch of writes about to run, one commit
        per mirror for the whole batch (the writes then find them logged)."""
        for m in self.mirrors:
            m.log_source_intents(ranges)

    def resize(self, size: int) -> None:
        raise Conflict("a mirrored LUN cannot be resized; delete its mirrors first")


class FaultyBackend(Layer):
    """Fails writes (and flushes) on demand with EIO, for fault-injection tests."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self.fail_writes = False

    def _check(self, what: str) -> None:
        if self.fail_writes:
            raise BackendError(f"injected {what} failure")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check("write")
        self.inner.write(offset, data)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self._check("zero")
        self.inner.zero(offset, length, may_trim=may_trim, fast_only=fast_only)

    def trim(self, offset: int, length: int) -> None:
        self._check("trim")
        self.inner.trim(offset, length)

    def flush(self) -> None:
        self._check("flush")
        self.inner.flush()


class PowerLossBackend(Layer):
    """Simulates a power loss for tests: :meth:`power_loss` drops every change
    that no completed flush covers, as a disk with a volatile cache would.

    Before each change the bytes it will overwrite are saved; a completed flush
    forgets them.  Size changes are kept (they are not data writes)."""

    def __init__(self, inner: Backend) -> None:
        super().__init__(inner)
        self._undo: list[tuple[int, bytes]] = []

    @property
    def unflushed(self) -> int:
        return len(self._undo)

    def _save(self, offset: int, length: int) -> None:
        length = max(0, min(length, self.inner.size - offset))
        if length:
            self._undo.append((offset, self.inner.read(offset, length)))

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._save(offset, len(data))
        self.inner.write(offset, data)

    def trim(self, offset: int, length: int) -> None:
        self._save(offset, length)
        self.inner.trim(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        self._save(offset, length)
        self.inner.zero(offset, length, may_trim=may_trim, fast_only=fast_only)

    def flush(self) -> None:
        self.inner.flush()
        self._undo.clear()  # only once the flush has completed

    def power_loss(self) -> int:
        """Put back what the unflushed changes overwrote; returns how many were dropped."""
        dropped = len(self._undo)
        for offset, old in reversed(self._undo):
            self.inner.write(offset, old)
        self._undo.clear()
        return dropped
