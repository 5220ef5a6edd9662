"""Numbers of the NBD protocol (NetworkBlockDevice/nbd ``doc/proto.md``).

All integers on the wire are big-endian.  Plain ints rather than enums on
purpose: they sit on the hot path of every request.
"""

from __future__ import annotations

import errno

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPTION_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

# Handshake flags (server) and client flags.
FLAG_FIXED_NEWSTYLE = 0x1
FLAG_NO_ZEROES = 0x2
SERVER_HANDSHAKE_FLAGS = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES

# Options.
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10

# Option reply types.
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_UNSUP = 0x80000001
REP_ERR_POLICY = 0x80000002
REP_ERR_INVALID = 0x80000003
REP_ERR_PLATFORM = 0x80000004
REP_ERR_TLS_REQD = 0x80000005
REP_ERR_UNKNOWN = 0x80000006
REP_ERR_SHUTDOWN = 0x80000007
REP_ERR_BLOCK_SIZE_REQD = 0x80000008
REP_ERR_TOO_BIG = 0x80000009

# Info types (OPT_INFO / OPT_GO).
INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

# Transmission flags.
TF_HAS_FLAGS = 0x1
TF_READ_ONLY = 0x2
TF_SEND_FLUSH = 0x4
TF_SEND_FUA = 0x8
TF_ROTATIONAL = 0x10
TF_SEND_TRIM = 0x20
TF_SEND_WRITE_ZEROES = 0x40
TF_SEND_DF = 0x80
TF_CAN_MULTI_CONN = 0x100
TF_SEND_RESIZE = 0x200
TF_SEND_CACHE = 0x400
TF_SEND_FAST_ZERO = 0x800

# Commands.
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

COMMAND_NAMES = {
    CMD_READ: "READ",
    CMD_WRITE: "WRITE",
    CMD_DISC: "DISC",
    CMD_FLUSH: "FLUSH",
    CMD_TRIM: "TRIM",
    CMD_CACHE: "CACHE",
    CMD_WRITE_ZEROES: "WRITE_ZEROES",
    CMD_BLOCK_STATUS: "BLOCK_STATUS",
}

# Command flags.
CMD_FLAG_FUA = 0x1
CMD_FLAG_NO_HOLE = 0x2
CMD_FLAG_DF = 0x4
CMD_FLAG_REQ_ONE = 0x8
CMD_FLAG_FAST_ZERO = 0x10

# Structured reply chunk types and flags.
REPLY_FLAG_DONE = 0x1
REPLY_TYPE_NONE = 0
REPLY_TYPE_OFFSET_DATA = 1
REPLY_TYPE_OFFSET_HOLE = 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR = 0x8001
REPLY_TYPE_ERROR_OFFSET = 0x8002

# base:allocation extent flags.
STATE_HOLE = 0x1
STATE_ZERO = 0x2

# Wire error numbers: the protocol fixes these values; only these may be sent.
EPERM = 1
EIO = 5
ENOMEM = 12
EINVAL = 22
ENOSPC = 28
EOVERFLOW = 75
ENOTSUP = 95
ESHUTDOWN = 108

_WIRE_ERRNOS = {
    errno.EPERM: EPERM,
    errno.EIO: EIO,
    errno.ENOMEM: ENOMEM,
    errno.EINVAL: EINVAL,
    errno.ENOSPC: ENOSPC,
    errno.EOVERFLOW: EOVERFLOW,
    errno.ENOTSUP: ENOTSUP,
    errno.ESHUTDOWN: ESHUTDOWN,
}


def wire_errno(host_errno: int) -> int:
    """Map a host errno to one the protocol allows (anything else becomes EINVAL)."""
    return _WIRE_ERRNOS.get(host_errno, EINVAL)


# Limits.
MIN_BLOCK = 1
PREFERRED_BLOCK = 4096
MAX_PAYLOAD = 32 << 20  # the largest READ/WRITE served; clients' own caps are 32-64 MiB
MAX_STRING = 4096  # export names, queries, error messages
MAX_OPTION_DATA = 64 << 10  # larger option payloads are skipped and refused (ERR_TOO_BIG)
MAX_OPTION_SKIP = 16 << 20  # ... up to this; beyond it the client is hung up on
#: Oversize WRITE payloads up to this are read and discarded (the protocol asks
#: servers to tolerate up to 32 MiB); beyond it the connection is closed.
MAX_WRITE_SKIP = 64 << 20
MAX_OPTIONS = 256  # per connection, against clients that never leave negotiation
MAX_EXTENTS = 1 << 20
