"""libnbd itself (the library behind nbdinfo and nbdcopy) on paths its tools never
take: an oversize WRITE and option data over 64 KiB.  (libnbd refuses to list meta
contexts without structured replies, so tests/nbd covers that with a raw client.)
There is no Python binding in the venv, so the C API is called through ctypes; the
library, its state machine and its checks are the real ones."""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Iterator

import pytest

from tests.support.daemon import Daemon

pytestmark = [pytest.mark.interop, pytest.mark.daemon]

MiB = 1 << 20
Handle = ctypes.c_void_p
_ContextCallback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_char_p)


class _ContextClosure(ctypes.Structure):
    """``nbd_context_callback``: passed by value."""

    _fields_ = [
        ("callback", _ContextCallback),
        ("user_data", ctypes.c_void_p),
        ("free", ctypes.c_void_p),
    ]


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("nbd") or "libnbd.so.0"
    try:
        lib = ctypes.CDLL(name)
    except OSError:
        pytest.fail("libnbd is missing (it comes with nbdinfo; run scripts/test.sh)")
    sigs: dict[str, tuple[object, list[object]]] = {
        "nbd_create": (Handle, []),
        "nbd_close": (None, [Handle]),
        "nbd_get_error": (ctypes.c_char_p, []),
        "nbd_get_errno": (ctypes.c_int, []),
        "nbd_set_strict_mode": (ctypes.c_int, [Handle, ctypes.c_uint32]),
        "nbd_set_opt_mode": (ctypes.c_int, [Handle, ctypes.c_bool]),
        "nbd_connect_uri": (ctypes.c_int, [Handle, ctypes.c_char_p]),
        "nbd_add_meta_context": (ctypes.c_int, [Handle, ctypes.c_char_p]),
        "nbd_opt_list_meta_context": (ctypes.c_int, [Handle, _ContextClosure]),
        "nbd_opt_go": (ctypes.c_int, [Handle]),
        "nbd_aio_is_dead": (ctypes.c_int, [Handle]),
        "nbd_pread": (
            ctypes.c_int,
            [Handle, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint32],
        ),
        "nbd_pwrite": (
            ctypes.c_int,
            [Handle, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_uint32],
        ),
    }
    for fn, (restype, argtypes) in sigs.items():
        getattr(lib, fn).restype = restype
        getattr(lib, fn).argtypes = argtypes
    return lib


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    return _load()


@pytest.fixture
def handle(lib: ctypes.CDLL) -> Iterator[int]:
    h = lib.nbd_create()
    assert h, lib.nbd_get_error()
    try:
        yield h
    finally:
        lib.nbd_close(h)


def error(lib: ctypes.CDLL) -> str:
    raw = lib.nbd_get_error()
    return raw.decode(errors="replace") if raw else ""


def read_works(lib: ctypes.CDLL, h: int) -> bytes:
    buf = ctypes.create_string_buffer(4096)
    assert lib.nbd_pread(h, buf, 4096, 0, 0) == 0, error(lib)
    return buf.raw


def test_oversize_write_fails_alone_and_the_connection_lives(
    daemon: Daemon, lib: ctypes.CDLL, handle: int
) -> None:
    assert lib.nbd_set_strict_mode(handle, 0) == 0  # let libnbd send past the maximum
    assert lib.nbd_connect_uri(handle, daemon.uri("demo").encode()) == 0, error(lib)
    n = 32 * MiB + 4096
    payload = ctypes.create_string_buffer(b"\x55" * n, n)
    assert lib.nbd_pwrite(handle, payload, n, 0, 0) == -1
    assert lib.nbd_get_errno() == 22, error(lib)  # EINVAL, from the server's reply
    assert lib.nbd_aio_is_dead(handle) == 0, error(lib)
    assert read_works(lib, handle) == bytes(4096)  # nothing of it was written


def test_option_data_over_64k_is_refused_and_negotiation_goes_on(
    daemon: Daemon, lib: ctypes.CDLL, handle: int
) -> None:
    assert lib.nbd_set_opt_mode(handle, True) == 0
    assert lib.nbd_connect_uri(handle, daemon.uri("demo").encode()) == 0, error(lib)
    for i in range(20):  # 20 queries of 4 KiB: over 64 KiB of option data
        assert lib.nbd_add_meta_context(handle, f"x{i}:{'q' * 4000}".encode()) == 0
    seen: list[bytes] = []

    def collect(_data: object, name: bytes) -> int:
        seen.append(name)
        return 0

    callback = _ContextCallback(collect)
    assert lib.nbd_opt_list_meta_context(handle, _ContextClosure(callback, None, None)) == -1
    assert lib.nbd_aio_is_dead(handle) == 0, error(lib)
    assert seen == []
    assert lib.nbd_opt_go(handle) == 0, error(lib)
    assert read_works(lib, handle) == bytes(4096)
