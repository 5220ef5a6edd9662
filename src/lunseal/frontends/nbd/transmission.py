"""Transmission phase: one request in, reply buffers out, engine calls between.

:meth:`Transmission.check` (command and flags) runs on the event loop;
:meth:`Transmission.execute` (range checks and the engine call) runs on the
LUN's worker thread.  The engine's own exceptions carry the NBD errno to reply
with.  Nothing a client
sends can raise out of :meth:`Transmission.handle`: unexpected failures become
EIO for that request and a log line, and the connection stays usable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from lunseal.engine.backends.base import Extent, FileSlice
from lunseal.engine.lun import Lun
from lunseal.errors import LunsealError, NoSpace
from lunseal.frontends.nbd import codec
from lunseal.frontends.nbd import constants as c
from lunseal.frontends.nbd.codec import Request

log = logging.getLogger(__name__)

#: Reads at least this long may go zero-copy (sendfile); shorter ones are read
#: on the LUN's worker.  The server pre-reads slices shorter than this itself.
ZERO_COPY_MIN = 64 << 10
#: Reads at least this long are checked for holes and answered with OFFSET_HOLE.
HOLE_SCAN_MIN = 256 << 10
#: Largest extent length that fits the u32 field, kept 4 KiB aligned.
MAX_EXTENT = 0xFFFFF000

# FUA is accepted on every command once advertised (the protocol requires it;
# some clients set it on reads); it only has an effect on the writing ones.
_ALLOWED_FLAGS = {
    c.CMD_READ: c.CMD_FLAG_FUA | c.CMD_FLAG_DF,
    c.CMD_WRITE: c.CMD_FLAG_FUA,
    c.CMD_DISC: c.CMD_FLAG_FUA,
    c.CMD_FLUSH: c.CMD_FLAG_FUA,
    c.CMD_TRIM: c.CMD_FLAG_FUA,
    c.CMD_CACHE: c.CMD_FLAG_FUA,
    c.CMD_WRITE_ZEROES: c.CMD_FLAG_FUA | c.CMD_FLAG_NO_HOLE | c.CMD_FLAG_FAST_ZERO,
    c.CMD_BLOCK_STATUS: c.CMD_FLAG_FUA | c.CMD_FLAG_REQ_ONE,
}
#: The commands a read-only grant refuses (EPERM, as a read-only LUN does).
_WRITES = frozenset({c.CMD_WRITE, c.CMD_TRIM, c.CMD_WRITE_ZEROES})

#: Reply pieces: bytes to send, or a file range the connection sends zero-copy.
Buffers = list[bytes | memoryview | FileSlice]


class RequestError(Exception):
    """A request the protocol forbids: reply with ``errno``, keep the connection."""

    def __init__(self, error: int, message: str) -> None:
        super().__init__(message)
        self.error = error
        self.message = message


class Transmission:
    def __init__(
        self,
        lun: Lun,
        *,
        structured: bool,
        base_allocation: bool,
        max_payload: int = c.MAX_PAYLOAD,
        read_only: bool = False,
    ) -> None:
        self.lun = lun
        #: The export ACL grants this client reading only.
        self.read_only = read_only
        self.structured = structured
        self.base_allocation = base_allocation
        self.max_payload = max_payload
        self._handlers: dict[int, Callable[[Request, Buffers], None]] = {
            c.CMD_READ: self._read,
            c.CMD_WRITE: self._write,
            c.CMD_FLUSH: self._flush,
            c.CMD_TRIM: self._trim,
            c.CMD_CACHE: self._cache,
            c.CMD_WRITE_ZEROES: self._zero,
            c.CMD_BLOCK_STATUS: self._block_status,
        }

    def handle(self, req: Request, out: Buffers) -> None:
        """Append the reply to ``req`` to ``out`` (DISC is the caller's business)."""
        if self.check(req, out):
            self.execute(req, out)

    def check(self, req: Request, out: Buffers) -> bool:
        """The cheap checks the event loop makes before handing ``req`` to the
        LUN's worker; False (with the error reply in ``out``) if it must not run."""
        if req.type not in self._handlers:
            self._error(req, c.EINVAL, f"unknown command {req.type}", out)
            return False
        if req.flags & ~_ALLOWED_FLAGS[req.type]:
            message = f"flags {req.flags:#x} not valid for this command"
            self._error(req, c.EINVAL, message, out)
            return False
        if self.read_only and req.type in _WRITES:
            self._error(req, c.EPERM, f"export {self.lun.name} is read-only for this client", out)
            return False
        return True

    def read_cached(self, req: Request, out: Buffers) -> bool:
        """Answer a short READ from the page cache, on the loop, if that needs
        no disk; False leaves it to the worker (which also reports any error)."""
        if req.type != c.CMD_READ or not 0 < req.length < ZERO_COPY_MIN:
            return False
        if req.flags & c.CMD_FLAG_DF and not self.structured:
            return False
        try:
            data = self.lun.read_cached(req.offset, req.length)
        except LunsealError:
            return False
        if data is None:
            return False
        if self.structured:
            out.append(codec.data_chunk_header(req.cookie, req.offset, req.length, done=True))
        else:
            out.append(codec.simple_reply(req.cookie))
        out.append(memoryview(data))
        return True

    def execute_batch(self, reqs: list[Request], out: Buffers) -> None:
        """Run checked requests in order as one batch of the LUN (on its worker)."""
        with self.lun.batch():
            for req in reqs:
                self.execute(req, out)

    def execute(self, req: Request, out: Buffers) -> None:
        """Run a checked request against the LUN (on its worker) and append the reply."""
        try:
            self._handlers[req.type](req, out)
        except RequestError as exc:
            self._error(req, exc.error, exc.message, out)
        except LunsealError as exc:
            self._error(req, c.wire_errno(exc.nbd_errno), exc.message, out)
        except Exception:
            log.exception("unexpected failure handling %s", c.COMMAND_NAMES.get(req.type))
            self._error(req, c.EIO, "internal error", out)

    def _error(self, req: Request, error: int, message: str, out: Buffers) -> None:
        if self.structured and req.type in (c.CMD_READ, c.CMD_BLOCK_STATUS):
            out.append(codec.error_chunk(req.cookie, error, message))
        else:
            out.append(codec.simple_reply(req.cookie, error))

    # -- commands ---------------------------------------------------------------

    def _read(self, req: Request, out: Buffers) -> None:
        if req.length > self.max_payload:
            raise RequestError(c.EINVAL, f"read of {req.length} bytes exceeds the maximum")
        if req.flags & c.CMD_FLAG_DF and not self.structured:
            raise RequestError(c.EINVAL, "DF requires structured replies")
        if self.structured and req.length == 0:
            self.lun.check_read_range(req.offset, 0)
            out.append(codec.none_chunk(req.cookie))
        elif self.structured and req.length >= HOLE_SCAN_MIN and not req.flags & c.CMD_FLAG_DF:
            self._read_sparse(req, out)  # lun.extents checks the range before anything is queued
        else:
            # The read checks the range (once); the header is queued only after it
            # passed.  A short one is read here, on the worker: a slice would be
            # pread on the event loop (see ZERO_COPY_MIN), where a slow disk stalls all.
            data: bytes | FileSlice
            if req.length < ZERO_COPY_MIN:
                data = self.lun.read(req.offset, req.length)
            else:
                data = self.lun.read_slice(req.offset, req.length)
            if self.structured:
                out.append(codec.data_chunk_header(req.cookie, req.offset, req.length, done=True))
            else:
                out.append(codec.simple_reply(req.cookie))
            out.append(data)

    def _read_sparse(self, req: Request, out: Buffers) -> None:
        extents = _clip(self.lun.extents(req.offset, req.length), req.offset, req.length)
        last = len(extents) - 1
        for i, ext in enumerate(extents):
            done = i == last
            if ext.zero:
                out.append(codec.hole_chunk(req.cookie, ext.offset, ext.length, done=done))
            else:
                out.append(codec.data_chunk_header(req.cookie, ext.offset, ext.length, done=done))
                out.append(self.lun.read_slice(ext.offset, ext.length))

    def _write(self, req: Request, out: Buffers) -> None:
        if req.oversize or req.payload is None:
            raise RequestError(c.EINVAL, f"write of {req.length} bytes exceeds the maximum")
        self.lun.write(req.offset, req.payload, fua=bool(req.flags & c.CMD_FLAG_FUA))
        out.append(codec.simple_reply(req.cookie))

    def _flush(self, req: Request, out: Buffers) -> None:
        self.lun.flush()
        out.append(codec.simple_reply(req.cookie))

    def _trim(self, req: Request, out: Buffers) -> None:
        try:
            self.lun.trim(req.offset, req.length, fua=bool(req.flags & c.CMD_FLAG_FUA))
        except NoSpace as exc:
            # The engine says ENOSPC for any write-like range past the end; the
            # protocol wants ENOSPC for WRITE/WRITE_ZEROES but EINVAL for TRIM.
            raise RequestError(c.EINVAL, exc.message) from None
        out.append(codec.simple_reply(req.cookie))

    def _cache(self, req: Request, out: Buffers) -> None:
        self.lun.cache(req.offset, req.length)
        out.append(codec.simple_reply(req.cookie))

    def _zero(self, req: Request, out: Buffers) -> None:
        self.lun.zero(
            req.offset,
            req.length,
            may_trim=not req.flags & c.CMD_FLAG_NO_HOLE,
            fast_only=bool(req.flags & c.CMD_FLAG_FAST_ZERO),
            fua=bool(req.flags & c.CMD_FLAG_FUA),
        )
        out.append(codec.simple_reply(req.cookie))

    def _block_status(self, req: Request, out: Buffers) -> None:
        if not self.structured or not self.base_allocation:
            raise RequestError(c.EINVAL, "no metadata context was negotiated")
        if req.length == 0:
            raise RequestError(c.EINVAL, "block status of zero length")
        extents = _clip(self.lun.extents(req.offset, req.length), req.offset, req.length)
        if req.flags & c.CMD_FLAG_REQ_ONE:
            extents = extents[:1]
        pairs = [(ext.length, _state(ext)) for ext in _split_long(extents)[: c.MAX_EXTENTS]]
        if req.flags & c.CMD_FLAG_REQ_ONE:
            pairs = pairs[:1]
        out.append(codec.block_status_chunk(req.cookie, 1, pairs))


def _state(ext: Extent) -> int:
    return (c.STATE_HOLE if ext.hole else 0) | (c.STATE_ZERO if ext.zero else 0)


def _clip(extents: list[Extent], offset: int, length: int) -> list[Extent]:
    end = offset + length
    clipped = []
    for ext in extents:
        start, stop = max(ext.offset, offset), min(ext.end, end)
        if stop > start:
            clipped.append(Extent(start, stop - start, ext.hole, ext.zero))
    return clipped


def _split_long(extents: list[Extent]) -> list[Extent]:
    out = []
    for ext in extents:
        pos, left = ext.offset, ext.length
        while left > 0:
            n = min(left, MAX_EXTENT)
            out.append(Extent(pos, n, ext.hole, ext.zero))
            pos, left = pos + n, left - n
    return out
