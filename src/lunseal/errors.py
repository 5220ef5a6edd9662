"""The one exception hierarchy of lunseal.

Every error a user can cause or see derives from :class:`LunsealError`.  The
wire codes that front ends need (HTTP status, CLI exit code, NBD errno) are
data on the classes, so each front end maps errors in exactly one place::

    LunsealError
    +-- InvalidArgument        bad name, size, flag or range          (400, EINVAL)
    |   +-- OutOfRange         request beyond the end of a LUN        (400, EINVAL)
    |   +-- NoSpace            write beyond the end of a LUN          (400, ENOSPC)
    +-- NotFound               no such LUN                            (404)
    +-- Conflict               name/number taken, LUN in use          (409)
    |   +-- LunUnavailable     the LUN's backing file cannot be used  (409)
    +-- ReadOnly               write to a read-only LUN               (403, EPERM)
    +-- NotSupported           operation the backend cannot do        (400, ENOTSUP)
    +-- BackendError           the storage failed                     (500, EIO)
    +-- CatalogError           the catalog (SQLite) failed, e.g. full (503, EIO)
    +-- Unauthorized           missing or wrong API token             (401)
    +-- Forbidden              the token's role may not do this       (403)
    +-- DaemonUnavailable      the CLI cannot reach a daemon          (exit 5)
    +-- DataDirLocked          another daemon owns the data directory (exit 6)
    +-- AddressInUse           a port the daemon should listen on is taken (exit 6)
    +-- ProtocolError          malformed wire framing: the connection is closed
    +-- ArchiveCorrupt         a backup archive object is damaged or missing (exit 8)
"""

from __future__ import annotations

import errno


class LunsealError(Exception):
    """Root of all lunseal errors; ``message`` is shown to the user as is."""

    http_status = 500
    exit_code = 1
    nbd_errno = errno.EIO
    code = "error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(LunsealError):
    http_status = 400
    exit_code = 2
    nbd_errno = errno.EINVAL
    code = "invalid_argument"


class OutOfRange(InvalidArgument):
    code = "out_of_range"


class NoSpace(InvalidArgument):
    nbd_errno = errno.ENOSPC
    code = "no_space"


class NotFound(LunsealError):
    http_status = 404
    exit_code = 3
    code = "not_found"


class Conflict(LunsealError):
    http_status = 409
    exit_code = 4
    code = "conflict"


class LunUnavailable(Conflict):
    """The LUN is listed but cannot serve: its backing file is missing, locked or refused."""

    code = "lun_unavailable"


class ReadOnly(LunsealError):
    http_status = 403
    exit_code = 4
    nbd_errno = errno.EPERM
    code = "read_only"


class NotSupported(LunsealError):
    http_status = 400
    exit_code = 2
    nbd_errno = errno.ENOTSUP
    code = "not_supported"


class BackendError(LunsealError):
    http_status = 500
    exit_code = 1
    nbd_errno = errno.EIO
    code = "backend_error"

    @classmethod
    def from_os_error(cls, what: str, exc: OSError) -> BackendError:
        err = cls(f"{what}: {exc.strerror or exc}")
        # Keep ENOSPC/EDQUOT visible to NBD clients: "disk full" is actionable.
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            err.nbd_errno = errno.ENOSPC
        return err


class CatalogError(LunsealError):
    """The catalog could not be read or written (its disk is full, an I/O error).

    Temporary from the client's point of view: nothing was done, retry later."""

    http_status = 503
    exit_code = 1
    nbd_errno = errno.EIO
    code = "catalog_error"


class Unauthorized(LunsealError):
    http_status = 401
    exit_code = 7
    code = "unauthorized"


class Forbidden(LunsealError):
    """A valid API token whose role does not allow the request."""

    http_status = 403
    exit_code = 7
    code = "forbidden"


class DaemonUnavailable(LunsealError):
    http_status = 503
    exit_code = 5
    code = "daemon_unavailable"


class DataDirLocked(LunsealError):
    exit_code = 6
    code = "data_dir_locked"


class AddressInUse(LunsealError):
    """Another process listens on a port the daemon was told to use."""

    exit_code = 6
    code = "address_in_use"


class ProtocolError(LunsealError):
    """A peer broke the framing of a wire protocol; only that connection is dropped."""

    code = "protocol_error"


class ArchiveCorrupt(LunsealError):
    """An archive chunk or manifest is damaged or missing; the message names what it affects."""

    exit_code = 8
    code = "archive_corrupt"


#: Every error class by its stable ``code``, so the API client can rebuild the
#: exception the daemon raised.
ERRORS_BY_CODE: dict[str, type[LunsealError]] = {
    cls.code: cls
    for cls in (
        LunsealError,
        InvalidArgument,
        OutOfRange,
        NoSpace,
        NotFound,
        Conflict,
        LunUnavailable,
        ReadOnly,
        NotSupported,
        BackendError,
        CatalogError,
        Unauthorized,
        Forbidden,
        DaemonUnavailable,
        DataDirLocked,
        AddressInUse,
        ProtocolError,
        ArchiveCorrupt,
    )
}
