"""The data directory: the only state an array has, and how to find it.

Layout::

    HOME/catalog.sqlite   the catalog (LUNs, and later tokens, mirrors, backups)
    HOME/luns/            backing files of LUNs lunseal created
    HOME/api-token        bearer token of the management API (0600)
    HOME/daemon.json      where the running daemon listens (removed at clean stop)
    HOME/nbd.sock         NBD Unix socket
    HOME/lock             flock'ed by the daemon that owns the directory
    HOME/.lunseal-data-dir  marker: no file below HOME may back another LUN
                          (written by the array, see lunseal.engine.backends.identity)
"""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from lunseal.fsutil import atomic_write

ENV_HOME = "LUNSEAL_HOME"
DEFAULT_HOME = "lunseal-data"


def resolve_home(home: Path | str | None = None) -> Path:
    """``--home``, else ``$LUNSEAL_HOME``, else ``./lunseal-data``."""
    chosen = home or os.environ.get(ENV_HOME) or DEFAULT_HOME
    return Path(chosen).expanduser().absolute()


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def api_token(self) -> Path:
        return self.root / "api-token"

    @property
    def daemon_info(self) -> Path:
        return self.root / "daemon.json"

    @property
    def nbd_socket(self) -> Path:
        return self.root / "nbd.sock"

    def ensure(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)

    def load_or_create_token(self) -> str:
        """The API token, generated on first start (32 random bytes, URL-safe)."""
        try:
            return self.api_token.read_text().strip()
        except FileNotFoundError:
            token = secrets.token_urlsafe(32)
            atomic_write(self.api_token, (token + "\n").encode(), mode=0o600)
            return token
