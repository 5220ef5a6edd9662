"""Sparse-file backend: pread/pwrite, punch-hole, SEEK_DATA/SEEK_HOLE, fsync.

Data calls run inline on the caller's thread.  For page-cache-resident data a
``pread`` costs about as much as handing the work to a thread pool would, and
skipping the hand-off is what lets the NBD server keep up with C servers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

from lunseal.engine.backends.base import Backend, Extent, FileSlice, FileStamp, merge_extents
from lunseal.errors import BackendError, Conflict, InvalidArgument, NotSupported

# linux/falloc.h
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_ZERO_CHUNK = 1 << 20

# Open-file-description locks (Linux 3.15+): owned by the open file, not the
# process, so closing another descriptor of the same file never drops them.
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
# struct flock: l_type, l_whence, l_start, l_len, l_pid (must be 0 for OFD locks).
_FLOCK = "hhqqi4x"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_fallocate = _libc.fallocate
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) with flags; Python's os module only offers plain allocation."""
    if _fallocate(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class FileBackend(Backend):
    kind = "file"

    def __init__(
        self,
        path: Path,
        *,
        create_size: int | None = None,
        expect: tuple[int, int] | None = None,
    ) -> None:
        """Open (or create) ``path``; never through a symlink, only a regular file.

        ``expect``: the (st_dev, st_ino) the caller validated; a different file
        found at open time (swapped in meanwhile) is refused.
        """
        self.path = path
        self._fd = -1
        flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            if create_size is not None:
                self._fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
                try:
                    os.ftruncate(self._fd, create_size)
                except OSError:
                    os.close(self._fd)
                    path.unlink(missing_ok=True)
                    raise
            else:
                self._fd = os.open(path, flags)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidArgument(
                    f"{path} is a symbolic link; give the path of the file itself"
                ) from None
            raise BackendError.from_os_error(f"cannot open backing file {path}", exc) from exc
        st = os.fstat(self._fd)
        self.identity = (st.st_dev, st.st_ino)
        #: The array serves only regular files; tests use devices (/dev/full) for faults.
        self.regular = stat.S_ISREG(st.st_mode)
        if expect is not None and self.identity != expect:
            self.close()
            raise Conflict(f"{path} was replaced by another file while being opened; try again")
        self._size = st.st_size
        self._can_punch = True
        self._can_zero_range = True

    def try_lock(self) -> bool:
        """Take an exclusive lock on the whole file; ``False`` if another open file has one."""
        request = struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        try:
            fcntl.fcntl(self._fd, F_OFD_SETLK, request)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                return False
            raise BackendError.from_os_error(f"cannot lock backing file {self.path}", exc) from exc
        return True

    @property
    def size(self) -> int:
        return self._size

    def read(self, offset: int, length: int) -> bytes:
        try:
            data = os.pread(self._fd, length, offset)
        except OSError as exc:
            raise BackendError.from_os_error(f"read failed on {self.path}", exc) from exc
        if len(data) < length:
            # The file was shortened behind our back: the missing tail reads as zeroes.
            data += bytes(length - len(data))
        return data

    def read_slice(self, offset: int, length: int) -> FileSlice:
        return FileSlice(self._fd, offset, length)

    def read_cached(self, offset: int, length: int) -> bytearray | None:
        # RWF_NOWAIT: the kernel copies from the page cache or says EAGAIN; it
        # never waits for the disk, so an event loop may call this.
        buf = bytearray(length)
        try:
            done = os.preadv(self._fd, [buf], offset, os.RWF_NOWAIT)
        except OSError:  # EAGAIN (not cached), EOPNOTSUPP, ...: read it the slow way
            return None
        return buf if done == length else None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        try:
            while view:
                done = os.pwrite(self._fd, view, offset)
                view = view[done:]
                offset += done
        except OSError as exc:
            raise BackendError.from_os_error(f"write failed on {self.path}", exc) from exc

    def flush(self) -> None:
        try:
            os.fdatasync(self._fd)
        except OSError as exc:
            raise BackendError.from_os_error(f"flush failed on {self.path}", exc) from exc

    def trim(self, offset: int, length: int) -> None:
        # Trim is advisory: where holes cannot be punched the data simply stays.
        if length and self._can_punch:
            self._punch(offset, length)

    def zero(self, offset: int, length: int, *, may_trim: bool, fast_only: bool) -> None:
        if length == 0:
            return
        if may_trim and self._can_punch and self._punch(offset, length):
            return
        if self._can_zero_range:
            try:
                fallocate(self._fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length)
                return
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise BackendError.from_os_error(f"zero failed on {self.path}", exc) from exc
                self._can_zero_range = False
        if fast_only:
            raise NotSupported("fast zeroing is not supported by this file system")
        self._write_zeroes(offset, length)

    def _punch(self, offset: int, length: int) -> bool:
        try:
            fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            return True
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS):
                raise BackendError.from_os_error(f"trim failed on {self.path}", exc) from exc
            self._can_punch = False
            return False

    def _write_zeroes(self, offset: int, length: int) -> None:
        zeroes = bytes(min(length, _ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeroes), end - offset)
            self.write(offset, memoryview(zeroes)[:n])
            offset += n

    def extents(self, offset: int, length: int) -> list[Extent]:
        end = min(offset + length, self._size)
        found: list[Extent] = []
        pos = offset
        try:
            while pos < end:
                data_start = self._seek(pos, os.SEEK_DATA)
                if data_start is None or data_start >= end:
                    found.append(Extent(pos, end - pos, hole=True, zero=True))
                    break
                if data_start > pos:
                    found.append(Extent(pos, data_start - pos, hole=True, zero=True))
                hole_start = self._seek(data_start, os.SEEK_HOLE)
                data_end = min(end, hole_start if hole_start is not None else end)
                found.append(Extent(data_start, data_end - data_start, hole=False, zero=False))
                pos = data_end
        except OSError as exc:
            raise BackendError.from_os_error(f"extent query failed on {self.path}", exc) from exc
        return merge_extents(found)

    def _seek(self, pos: int, whence: int) -> int | None:
        try:
            return os.lseek(self._fd, pos, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no more data after pos
                return None
            raise

    def stamp(self) -> FileStamp:
        st = os.fstat(self._fd)
        return FileStamp(st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def cache(self, offset: int, length: int) -> None:
        try:
            os.posix_fadvise(self._fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError as exc:
            raise BackendError.from_os_error(f"prefetch failed on {self.path}", exc) from exc

    def resize(self, size: int) -> None:
        try:
            os.ftruncate(self._fd, size)
        except OSError as exc:
            raise BackendError.from_os_error(f"resize failed on {self.path}", exc) from exc
        self._size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
