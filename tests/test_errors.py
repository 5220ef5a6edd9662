"""The one error hierarchy: every class carries its wire codes as data."""

from __future__ import annotations

import errno
import inspect

import pytest

from lunseal import errors
from lunseal.errors import (
    ERRORS_BY_CODE,
    AddressInUse,
    ArchiveCorrupt,
    BackendError,
    CatalogError,
    Conflict,
    DaemonUnavailable,
    DataDirLocked,
    Forbidden,
    InvalidArgument,
    LunsealError,
    LunUnavailable,
    NoSpace,
    NotFound,
    NotSupported,
    OutOfRange,
    ProtocolError,
    ReadOnly,
    Unauthorized,
)

#: class: (code, http_status, exit_code, nbd_errno)
EXPECTED: dict[type[LunsealError], tuple[str, int, int, int]] = {
    LunsealError: ("error", 500, 1, errno.EIO),
    InvalidArgument: ("invalid_argument", 400, 2, errno.EINVAL),
    OutOfRange: ("out_of_range", 400, 2, errno.EINVAL),
    NoSpace: ("no_space", 400, 2, errno.ENOSPC),
    NotFound: ("not_found", 404, 3, errno.EIO),
    Conflict: ("conflict", 409, 4, errno.EIO),
    LunUnavailable: ("lun_unavailable", 409, 4, errno.EIO),
    ReadOnly: ("read_only", 403, 4, errno.EPERM),
    NotSupported: ("not_supported", 400, 2, errno.ENOTSUP),
    BackendError: ("backend_error", 500, 1, errno.EIO),
    CatalogError: ("catalog_error", 503, 1, errno.EIO),
    Unauthorized: ("unauthorized", 401, 7, errno.EIO),
    Forbidden: ("forbidden", 403, 7, errno.EIO),
    DaemonUnavailable: ("daemon_unavailable", 503, 5, errno.EIO),
    DataDirLocked: ("data_dir_locked", 500, 6, errno.EIO),
    AddressInUse: ("address_in_use", 500, 6, errno.EIO),
    ProtocolError: ("protocol_error", 500, 1, errno.EIO),
    ArchiveCorrupt: ("archive_corrupt", 500, 8, errno.EIO),
}


@pytest.mark.parametrize("cls", EXPECTED, ids=lambda cls: cls.__name__)
def test_codes(cls: type[LunsealError]) -> None:
    assert (cls.code, cls.http_status, cls.exit_code, cls.nbd_errno) == EXPECTED[cls]


def test_every_error_class_is_listed() -> None:
    defined = {
        obj
        for obj in vars(errors).values()
        if inspect.isclass(obj) and issubclass(obj, LunsealError)
    }
    assert defined == set(EXPECTED) == set(ERRORS_BY_CODE.values())


@pytest.mark.parametrize("cls", EXPECTED, ids=lambda cls: cls.__name__)
def test_code_round_trip(cls: type[LunsealError]) -> None:
    rebuilt = ERRORS_BY_CODE[cls("boom").code]("boom")
    assert type(rebuilt) is cls
    assert rebuilt.message == str(rebuilt) == "boom"


def test_range_errors_are_invalid_arguments() -> None:
    assert issubclass(OutOfRange, InvalidArgument)
    assert issubclass(NoSpace, InvalidArgument)
    assert not issubclass(NoSpace, OutOfRange)


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_backend_disk_full_keeps_enospc(code: int) -> None:
    err = BackendError.from_os_error("write failed", OSError(code, "disk full"))
    assert err.nbd_errno == errno.ENOSPC
    assert err.message == "write failed: disk full"
    assert BackendError.nbd_errno == errno.EIO


def test_other_backend_failures_are_eio() -> None:
    err = BackendError.from_os_error("read failed", OSError(errno.EBADF, "Bad file descriptor"))
    assert err.nbd_errno == errno.EIO
    assert "Bad file descriptor" in err.message
