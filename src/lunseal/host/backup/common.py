"""Pieces shared by backup and restore: NBD URIs, waiting for mirrors, progress."""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field

from lunseal.errors import BackendError, LunsealError
from lunseal.host.client import ArrayClient
from lunseal.schema.mirrors import MirrorInfo

COPYING = ("syncing", "resyncing", "restoring")

#: Called with (what, bytes done, bytes total) as work progresses; always bytes,
#: so a display can show sizes.  ``done >= total`` means that piece is finished.
ProgressFn = Callable[[str, int, int], None]


def no_progress(what: str, done: int, total: int) -> None:
    """Progress sink for scripts (--json) and tests."""


@dataclass
class Log:
    """The steps a flow took, printed as it goes and returned for --json."""

    say: Callable[[str], None] = print
    steps: list[str] = field(default_factory=list)

    def __call__(self, message: str) -> None:
        self.steps.append(message)
        self.say(message)


def nbd_uri(api: ArrayClient, lun: str) -> str:
    """The LUN's Unix-socket URI when the socket is reachable here, else its TCP URI.

    A TCP URI on a loopback address is rewritten to the API's host, so a tool
    on another machine reaches the array it manages.
    """
    uris = api.show_lun(lun).nbd_uris
    for uri in uris:
        if uri.startswith("nbd+unix:"):
            sock = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query).get("socket", [""])[0]
            if sock and os.path.exists(sock):
                return uri
    for uri in uris:
        if uri.startswith(("nbd://", "nbds://")):
            return _reachable(uri, api.url)
    raise LunsealError(f"LUN {lun} has no NBD endpoint this host can reach")


def _reachable(uri: str, api_url: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    api_host = urllib.parse.urlsplit(api_url).hostname or ""
    if parts.hostname in ("127.0.0.1", "::1", "localhost") and api_host not in ("", parts.hostname):
        netloc = f"{api_host}:{parts.port}" if parts.port else api_host
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def wait_mirror(
    api: ArrayClient, name: str, progress: ProgressFn, timeout: float = 3600.0
) -> MirrorInfo:
    """Poll until the mirror's copy is done; raise if it ends degraded."""
    info = api.mirror(name)
    what, total = f"{info.state} {name}", info.bytes_left
    deadline = time.monotonic() + timeout
    while info.state in COPYING:
        total = max(total, info.bytes_left)  # host writes may add regions while it runs
        progress(what, total - info.bytes_left, total)
        if time.monotonic() > deadline:
            raise LunsealError(f"mirror {name} still {info.state} after {timeout:.0f}s")
        time.sleep(0.01)
        info = api.mirror(name)
    progress(what, total, total)  # the same bar, finished (a progress sink drops it)
    if info.state == "degraded":
        raise BackendError(f"mirror {name} is degraded: {info.reason}")
    return info
